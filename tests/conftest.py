"""Shared fixtures: baby Hugging Face checkpoints, built once per session (a few seconds each)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(scope="session")
def baby(tmp_path_factory) -> Callable[..., Path]:
    """`baby(family, **overrides)` -> path of a baby checkpoint (cached per family and overrides)."""
    pytest.importorskip("transformers")
    from moepack.testing.checkpoints import make_baby_checkpoint

    made: dict[str, Path] = {}

    def get(family: str, **overrides) -> Path:
        key = family + repr(sorted(overrides.items()))
        if key not in made:
            path = tmp_path_factory.mktemp(f"baby-{family}")
            made[key] = make_baby_checkpoint(family, path, **overrides)
        return made[key]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared, loaded 2-core host, torch's thread pool makes small ops
    10-100x slower (OpenMP barriers stall whenever the other core is taken)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
