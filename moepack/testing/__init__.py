"""Checkpoint generators for tests and benchmarks (torch; transformers only inside the baby builder).

Names resolve lazily so `python -m moepack.testing.checkpoints` runs without a double import."""

from __future__ import annotations

from typing import Any

__all__ = ["BABY_FAMILIES", "baby_config", "make_baby_checkpoint", "make_random_checkpoint", "make_tokenizer_json"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moepack.testing import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module 'moepack.testing' has no attribute {name!r}")
