"""Reading source checkpoints (local folders, hub ids, aliases) tensor by tensor."""

from moepack.source.checkpoint import Checkpoint
from moepack.source.resolve import ALIASES, default_pack_path, pack_store, resolve_pack, resolve_source

__all__ = ["ALIASES", "Checkpoint", "default_pack_path", "pack_store", "resolve_pack", "resolve_source"]
