"""The CUDA sources compile (this machine's torch has no CUDA, so they are compiled directly).

dequant_cuda.cu includes no torch header, so `nvcc -c` checks every kernel and launcher; the torch
binding is syntax-checked with the host compiler against torch's headers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moepack.kernels._build import CSRC

NVCC = shutil.which("nvcc") or (
    str(Path("/usr/local/cuda/bin/nvcc")) if Path("/usr/local/cuda/bin/nvcc").exists() else None
)


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (for cuda_runtime.h), or None."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if NVCC:
        candidates.append(Path(NVCC).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in /usr/local/cuda/bin")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    cmd = [
        NVCC,
        "-c",
        "-std=c++17",
        "-O3",
        "-arch=sm_80",
        "-Werror",
        "all-warnings",
        str(CSRC / "dequant_cuda.cu"),
        "-o",
        str(tmp_path / "dequant_cuda.o"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "dequant_cuda.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None or _cuda_include() is None,
    reason="no host C++ compiler or no CUDA toolkit headers (cuda_runtime.h)",
)
def test_cuda_binding_syntax(tmp_path):
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include()
    # CPU wheels ship c10/cuda headers but not the generated cuda_cmake_macros.h: stand one in.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [
        "c++",
        "-std=c++17",
        "-fsyntax-only",
        f"-I{tmp_path}",
        *(f"-I{p}" for p in include_paths()),
        f"-I{cuda_inc}",
        str(CSRC / "dequant_cuda_binding.cpp"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and a CUDA build of torch")
@pytest.mark.parametrize("dq", [False, True], ids=["fp16meta", "dqmeta"])
@pytest.mark.parametrize("cols", [512, 100, 160, 200, 2880, 37])
def test_cuda_matches_torch(cols, dq):
    """Fused (up to 8 tokens) and dequantise-and-GEMM (17) products, and the dequantiser, against the
    reference; widths that are not a multiple of the group (a ragged last group, format version 2) and
    not of 32 or 8 (partial blocks and octets, byte loads, random pad bits at the rows' ends); with fp16
    or double-quantised metadata (q{b}g{G}d: u8 codes under per-row fp16 factors)."""
    from moepack.codecs import as_recipe, decode
    from moepack.kernels import Backend, compiled, matmul, matmul_t
    from moepack.kernels._build import CUDA

    g = torch.Generator().manual_seed(cols)
    for bits in (2, 3, 4):
        for group in (32, 128):
            for T in (1, 5, 17):
                rows_n = 96
                ng, nbytes = -(-cols // group), -(-cols * bits // 8)
                parts = {"codes": torch.randint(0, 256, (rows_n, nbytes), generator=g, dtype=torch.uint8)}
                if dq:
                    parts["gscale"] = torch.randint(1, 256, (rows_n, ng), generator=g, dtype=torch.uint8)
                    parts["gzero"] = torch.randint(0, 256, (rows_n, ng), generator=g, dtype=torch.uint8)
                    parts["rowq"] = torch.stack([torch.rand(rows_n, generator=g) * 4e-4 + 1e-5,
                                                 torch.rand(rows_n, generator=g) * 2 - 1,
                                                 torch.rand(rows_n, generator=g) * 2**bits / 255], 1).half()
                else:
                    parts["scale"] = (torch.rand(rows_n, ng, generator=g) * 0.1 + 1e-3).half()
                    parts["zero"] = (torch.rand(rows_n, ng, generator=g) * (2**bits - 1)).half()
                recipe, shape = f"q{bits}g{group}{'d' if dq else ''}", (rows_n, cols)
                gpu = {k: v.cuda() for k, v in parts.items()}
                rows = torch.randperm(rows_n, generator=g)[:33]
                x, h = torch.randn(T, cols, generator=g), torch.randn(T, 33, generator=g)
                for op, inp in ((matmul, x), (matmul_t, h)):
                    ref = op(inp, parts, recipe, shape, rows, backend=Backend.TORCH)
                    got = op(inp.cuda(), gpu, recipe, shape, rows.cuda(), backend=Backend.CUDA).cpu()
                    err = float((got - ref).abs().max() / ref.abs().max())
                    assert err < 1e-5, (op.__name__, recipe, cols, T, err)
            want = decode(parts, recipe, shape)
            got = compiled.dequantize(CUDA, gpu, as_recipe(recipe), cols, rows.cuda(), "cuda").cpu()
            assert torch.equal(got, want[rows]), (recipe, cols)
