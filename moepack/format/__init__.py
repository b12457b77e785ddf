"""The .moepack container (normative spec: docs/format.md)."""

from moepack.format.reader import Pack, check_pack, is_pack, projection_parts
from moepack.format.records import (
           ExpertRecord,
           Manifest,
           PartRecord,
           ProjectionRecord,
           ShardRecord,
           TensorRecord,
)
from moepack.format.writer import PackWriter

__all__ = ["Pack", "PackWriter", "check_pack", "is_pack", "projection_parts", "ExpertRecord", "Manifest", "PartRecord",
           "ProjectionRecord", "ShardRecord", "TensorRecord"]
