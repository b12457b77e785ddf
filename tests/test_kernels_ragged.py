"""The C++ kernels on rows of any length (format version 2): a ragged last group, a partial last block of
32 codes, a row of bytes that ends mid-word. Every CPU code path (generic, AVX2, AVX-512, VNNI), the
integer GEMV (int8 activations, one and two planes) and the exact fp32 kernels, few tokens (fused) and
many (the blocked dequantise-and-GEMM path), matmul and matmul_t, all rows or a subset, against the TORCH
reference on fresh random inputs. Tolerances as in test_kernels.py. Each also with double-quantised
metadata (`q{b}g{G}d`: u8 scale and zero codes under per-row fp16 factors, read by the kernels directly).
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import _assert_close, _rel_err, cpp, isa, q8  # noqa: F401 - the fixtures, shared

from moepack.codecs import as_recipe, decode, encode
from moepack.kernels import Backend, compiled, matmul, matmul_t

WIDTHS = (100, 160, 200, 2880)
ROWS = 29


def _random_ragged(bits: int, group: int, cols: int, seed: int, rows: int = ROWS, dq: bool = False):
    """Random parts of a ragged matrix: every code value, and random pad bits at each row's end (which
    no kernel may read as a weight); with dq, random metadata codes and row factors."""
    g = torch.Generator().manual_seed(seed)
    ng, nbytes = -(-cols // group), -(-cols * bits // 8)
    parts = {"codes": torch.randint(0, 256, (rows, nbytes), generator=g, dtype=torch.uint8)}
    if dq:
        parts["gscale"] = torch.randint(1, 256, (rows, ng), generator=g, dtype=torch.uint8)
        parts["gzero"] = torch.randint(0, 256, (rows, ng), generator=g, dtype=torch.uint8)
        parts["rowq"] = torch.stack([torch.rand(rows, generator=g) * 4e-4 + 1e-5,
                                     torch.rand(rows, generator=g) * 2 - 1,
                                     torch.rand(rows, generator=g) * (2**bits) / 255], dim=1).half()
    else:
        parts["scale"] = (torch.rand(rows, ng, generator=g) * 0.1 + 1e-3).half()
        parts["zero"] = (torch.rand(rows, ng, generator=g) * (2**bits - 1)).half()
    return parts, f"q{bits}g{group}{'d' if dq else ''}", (rows, cols), g


@pytest.mark.parametrize("dq", [False, True], ids=["fp16meta", "dqmeta"])
@pytest.mark.parametrize("cols", WIDTHS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ragged_rows_match_torch(isa, q8, bits, group, cols, dq):  # noqa: F811 - fixtures
    parts, recipe, shape, g = _random_ragged(bits, group, cols, seed=cols * 10 + bits * group, dq=dq)
    rows = torch.randperm(ROWS, generator=g)[:13]
    for T in (1, 3, 8, 12):
        for r in (None, rows):
            n = ROWS if r is None else 13
            x, h = torch.randn(T, cols, generator=g), torch.randn(T, n, generator=g)
            for op, inp in ((matmul, x), (matmul_t, h)):
                ref = op(inp, parts, recipe, shape, r, backend=Backend.TORCH)
                got = op(inp, parts, recipe, shape, r, backend=Backend.CPP)
                planes = q8 if op is matmul and bits != 3 and T <= compiled.FUSED_MAX_T else 0
                bf16 = T > compiled.FUSED_MAX_T and compiled.quant_gemm()[0] == torch.bfloat16  # bf16 prefill
                _assert_close(got, ref, planes, f"{isa} {op.__name__} {recipe} cols={cols} T={T} rows={r is not None}",
                              bf16)


@pytest.mark.parametrize("dq", [False, True], ids=["fp16meta", "dqmeta"])
@pytest.mark.parametrize("cols", WIDTHS + (37, 1, 512))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ragged_dequant_is_bit_exact(cpp, isa, bits, cols, dq):  # noqa: F811 - fixtures
    """fp32 and bf16 outputs equal the reference decode (bf16: rounded to nearest even), and nothing is
    written past a row's end (the rows of the output are exactly [n, cols])."""
    group = 64
    parts, recipe, shape, g = _random_ragged(bits, group, cols, seed=cols + bits, dq=dq)
    full = decode(parts, recipe, shape)
    base = as_recipe(recipe)
    rows = torch.tensor([5, 0, ROWS - 1, 5])
    assert torch.equal(compiled.dequantize(cpp, parts, base, cols, None, "cpu"), full)
    assert torch.equal(compiled.dequantize(cpp, parts, base, cols, rows, "cpu"), full[rows])
    c, s, z, f = compiled.quant_args(parts, torch.device("cpu"))
    got = cpp.load().qdequant(c, s, z, rows, bits, group, cols, True, rowq=f)
    assert got.dtype == torch.bfloat16 and torch.equal(got, full[rows].bfloat16())


@pytest.mark.parametrize("recipe", ["q4g128", "q2g64", "q3g128", "q4g64+r4", "bf16", "q4g128d", "q2g64d", "q3g32d"])
def test_encoded_ragged_matrix_auto_backend(cpp, recipe):  # noqa: F811 - fixtures
    """A real encode of a GPT-OSS-wide row (2880 = 22.5 groups of 128) through the default backend, bf16
    activations included: close to the reference for one token and for a prefill-sized block."""
    g = torch.Generator().manual_seed(11)
    shape = (40, 2880)
    parts = encode(torch.randn(*shape, generator=g), recipe)
    for T in (1, 20):
        x, h = torch.randn(T, 2880, generator=g), torch.randn(T, 40, generator=g)
        for op, inp in ((matmul, x), (matmul_t, h)):
            ref = op(inp, parts, recipe, shape, backend="torch")
            assert _rel_err(op(inp, parts, recipe, shape), ref) < 1e-2, f"{op.__name__} T={T}"
            got = op(inp.bfloat16(), parts, recipe, shape)
            assert got.dtype == torch.bfloat16 and _rel_err(got.float(), ref) < 3e-2
