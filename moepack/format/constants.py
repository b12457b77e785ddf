"""Constants shared by the pack writer and reader (the single source of truth; docs/format.md mirrors it)."""

from __future__ import annotations

import torch

MANIFEST_NAME = "manifest.json"
MANIFEST_MAGIC = "moepack"  # the manifest's "magic" field
SHARD_MAGIC = b"MOEPACK\x00"  # the first 8 bytes of every shard
FORMAT_VERSION = 2  # docs/format.md, "Version history"
SUPPORTED_VERSIONS = (1, 2)  # version 1 packs (no ragged groups or short N:M blocks) still read

SHARD_HEADER_BYTES = 4096  # header area at the start of each shard; data begins after it
EXPERT_ALIGNMENT = 4096  # every expert blob starts on a 4 KiB boundary (page, O_DIRECT, DMA friendly)
PART_ALIGNMENT = 64  # every part inside an expert blob, and every dense tensor, starts on 64 bytes
TENSOR_ALIGNMENT = 64

DEFAULT_SHARD_BYTES = 2 << 30  # a shard is closed once the next record would pass this size
MAX_MANIFEST_BYTES = 256 << 20  # reader refuses larger manifests before parsing them
MAX_OFFSET = 1 << 50  # any offset or size beyond this is rejected as hostile

SHARD_NAME_FORMAT = "shard-{:05d}.bin"
CHECKSUM_ALGORITHM = "xxh3_64"
PROJECTIONS = ("up", "gate", "down")  # order of projections inside an expert blob

# dtype names used in the manifest <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "u8": torch.uint8,
    "i8": torch.int8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
