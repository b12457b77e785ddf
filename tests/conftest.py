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


@pytest.fixture
def quant_gemm(monkeypatch):
    """`quant_gemm("0")` sets MOEPACK_CPU_BF16 for the test (None: unset) and makes the kernels read it again
    (quantised products of many tokens in float32 with "0", in bf16 where the CPU has it otherwise)."""
    from moepack.kernels import compiled

    def set_(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(compiled.BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(compiled.BF16_ENV, value)
        compiled.quant_gemm.cache_clear()

    yield set_
    compiled.quant_gemm.cache_clear()  # before monkeypatch restores the variable: read again on next use


@pytest.fixture
def exact_prefill(quant_gemm):
    """Quantised products of many tokens in float32 (MOEPACK_CPU_BF16=0): exact up to summation order."""
    quant_gemm("0")
