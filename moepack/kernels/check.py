"""Which CPU code path the kernels use here, and a check of every path against the TORCH reference.

`moepack doctor` prints `report()`. Each path this CPU can run (`isas`, best first) multiplies small
random matrices of every recipe family the C++ backend serves, at a width of whole groups and at a ragged
one (format version 2), one and three tokens (the fused kernels) and twelve (the blocked GEMM path), and is
compared with the reference by SQNR in dB:
  * products with int8 activations (q2/q4 matmul of up to 8 tokens, MOEPACK_CPU_Q8=1 or 2): at least
    Q8_SQNR_DB[planes] (one plane rounds each block of 32 activations to 8 bits, about 43 dB on Gaussian
    inputs; two planes add the residual, about 15 bits);
  * quantised products of more than 8 tokens where they multiply in bf16 (`compiled.quant_gemm`: CPUs with
    AVX-512 BF16 or AMX, unless MOEPACK_CPU_BF16=0): at least BF16_SQNR_DB (weights and activations each
    rounded to bf16, float32 accumulation: about 50 dB on Gaussian inputs);
  * every other product (decoded weights are bit-exact, only the fp32 summation order differs):
    at least EXACT_SQNR_DB.
"""

from __future__ import annotations

import math

import torch

Q8_SQNR_DB = {1: 35.0, 2: 70.0}  # by the number of int8 planes
BF16_SQNR_DB = 45.0  # quantised weights and float32 activations rounded to bf16 for the GEMM
EXACT_SQNR_DB = 100.0
CHECK_RECIPES = ("q4g128", "q4g32", "q3g64", "q2g64", "q4g128d", "q2g64d", "bf16", "fp16")
CHECK_WIDTHS = (384, 200)  # whole groups; a ragged last group and a partial block of 32


def sqnr_db(got: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |got - ref|^2); inf when equal."""
    err = float(((got.double() - ref.double()) ** 2).sum())
    sig = float((ref.double() ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(sig / err)


def display_isa(name: str) -> str:
    return name.replace("_", "-")


def check_paths(recipes=CHECK_RECIPES, rows: int = 40, widths=CHECK_WIDTHS, seed: int = 0) -> list[dict]:
    """One record per (ISA path, recipe, width, op, tokens): sqnr_db, bound_db, ok. Restores the path in
    use."""
    from moepack.codecs import as_recipe, encode
    from moepack.kernels import Backend, matmul, matmul_t
    from moepack.kernels._build import CPP
    from moepack.kernels.compiled import FUSED_MAX_T, wide_dtype

    ops = CPP.load()
    current = ops.isa()
    g = torch.Generator().manual_seed(seed)
    out = []
    try:
        for isa in ops.isas():
            ops.set_isa(isa)
            planes = int(ops.q8())
            for recipe, cols in ((rc, c) for rc in recipes for c in widths):
                r, shape = as_recipe(recipe), (rows, cols)
                parts = encode(torch.randn(*shape, generator=g), recipe)
                for tokens in (1, 3, 12):
                    x, h = torch.randn(tokens, cols, generator=g), torch.randn(tokens, rows, generator=g)
                    for op, inp in ((matmul, x), (matmul_t, h)):
                        ref = op(inp, parts, recipe, shape, backend=Backend.TORCH)
                        got = op(inp, parts, recipe, shape, backend=Backend.CPP)
                        q8 = op is matmul and r.quantized and r.bits in (2, 4) and tokens <= FUSED_MAX_T
                        q8 = planes if q8 else 0
                        bf16 = tokens > FUSED_MAX_T and wide_dtype(r, torch.float32, "cpu") == torch.bfloat16
                        bound = Q8_SQNR_DB[q8] if q8 else BF16_SQNR_DB if bf16 else EXACT_SQNR_DB
                        s = sqnr_db(got, ref)
                        out.append({"isa": display_isa(isa), "recipe": recipe, "cols": cols, "op": op.__name__,
                                    "tokens": tokens,
                                    "int8_planes": q8, "sqnr_db": round(s, 1) if math.isfinite(s) else None,
                                    "bound_db": bound, "ok": s >= bound})
    finally:
        ops.set_isa(current)
    return out


def report(check: bool = True) -> dict:
    """Build the C++ kernels (if not yet built), check them, and describe the environment."""
    import time

    from moepack.errors import KernelUnavailableError
    from moepack.kernels._build import CPP

    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    name, folder = CPP.build_dir()
    cpp = {"available": False, "reason": None, "build_dir": str(folder), "isas": []}
    t0 = time.monotonic()
    try:
        ops = CPP.load()
    except KernelUnavailableError as e:
        cpp["reason"] = str(e)
        info.update(cpp=cpp, isa="torch", int8_planes=0, checks=[])
        return info
    cpp.update(available=True, isas=[display_isa(i) for i in ops.isas()],
               compiled_now=CPP.build_seconds is not None, load_seconds=round(time.monotonic() - t0, 2))
    from moepack.kernels.compiled import quant_gemm

    dtype, why = quant_gemm()
    info.update(cpp=cpp, isa="cpp-" + display_isa(ops.isa()), int8_planes=int(ops.q8()),
                prefill_gemm=str(dtype).removeprefix("torch."), prefill_gemm_why=why)
    info["checks"] = check_paths() if check else []
    return info
