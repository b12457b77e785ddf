"""Quantised products of many tokens (prefill) in bf16 on CPUs with bf16 dot products.

Above FUSED_MAX_T tokens the CPP backend dequantises a block of rows and calls torch's GEMM. For quantised
(lossy) weights and float32 inputs that GEMM runs in bf16 (float32 accumulation) where the CPU has AVX-512
BF16 or AMX (`compiled.quant_gemm`), unless MOEPACK_CPU_BF16=0. Tolerance against the TORCH reference on
fresh random inputs: SQNR >= BF16_SQNR_DB (45 dB; weights and activations each rounded to bf16 give about
50 dB on Gaussian inputs). With the variable at 0, and for passthrough (lossless) weights always, the
products stay exact: max|diff| / max|ref| < 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from moepack.codecs import decode, encode
from moepack.codecs.recipe import as_recipe
from moepack.errors import KernelUnavailableError
from moepack.kernels import Backend, compiled, kernel_name, matmul, matmul_t
from moepack.kernels._build import CPP as CPP_EXT
from moepack.kernels.check import BF16_SQNR_DB, sqnr_db
from moepack.runtime.prepared import Projection

REL_TOL = 1e-5
RECIPES = ("q4g128", "q4g64", "q4g32", "q3g64", "q3g32", "q2g64", "q2g32", "q4g64+r8", "q2g32+r4")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module")
def cpp():
    if not CPP_EXT.available():
        pytest.skip(f"C++ kernels unavailable here: {CPP_EXT._error or CPP_EXT.disabled_reason()}")
    return CPP_EXT


@pytest.fixture
def bf16_cpu(cpp, quant_gemm):
    """The switch at its default; skips where this CPU (or torch) has no bf16 GEMM."""
    quant_gemm(None)
    dtype, why = compiled.quant_gemm()
    if dtype != torch.bfloat16:
        pytest.skip(f"no bf16 prefill here: {why}")
    return cpp


def _fake_cpu(monkeypatch, *, bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_the_switch_and_the_cpu_decide(quant_gemm, monkeypatch):
    """0 keeps float32 and says so; a bad value is a typed error naming the variable; a CPU without AVX-512
    BF16 or AMX keeps float32 and says why; with either, bf16 (where torch's oneDNN serves bf16)."""
    quant_gemm("0")
    assert compiled.quant_gemm() == (torch.float32, "float32 (MOEPACK_CPU_BF16=0)")
    quant_gemm("yes please")
    with pytest.raises(KernelUnavailableError, match="MOEPACK_CPU_BF16 must be 0"):
        compiled.quant_gemm()
    _fake_cpu(monkeypatch, bf16=False, amx=False)
    quant_gemm(None)
    dtype, why = compiled.quant_gemm()
    assert dtype == torch.float32 and "no AVX-512 BF16 or AMX" in why
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for bf16, amx, names in ((True, False, "avx512-bf16"), (False, True, "amx"), (True, True, "avx512-bf16+amx")):
        _fake_cpu(monkeypatch, bf16=bf16, amx=amx)
        quant_gemm("1")
        dtype, why = compiled.quant_gemm()
        assert dtype == (torch.bfloat16 if onednn else torch.float32)
        assert (names in why) == onednn


def test_only_lossy_weights_with_float32_inputs_on_the_cpu_change(quant_gemm, monkeypatch):
    """wide_dtype: bf16 inputs always multiply in bf16; quantised weights follow quant_gemm on the CPU only;
    passthrough weights in float32 compute, N:M (TORCH) and CUDA stay float32."""
    from moepack.codecs import as_recipe

    _fake_cpu(monkeypatch, bf16=True, amx=True)
    quant_gemm(None)
    on = compiled.quant_gemm()[0]
    for recipe, device, dtype, want in (
        ("q4g128", "cpu", torch.float32, on), ("q2g64+r8", "cpu", torch.float32, on),
        ("q4g128", "cpu", torch.bfloat16, torch.bfloat16), ("bf16", "cpu", torch.bfloat16, torch.bfloat16),
        ("bf16", "cpu", torch.float32, torch.float32), ("fp16", "cpu", torch.float32, torch.float32),
        ("fp32", "cpu", torch.float32, torch.float32), ("2:4+q4g32", "cpu", torch.float32, torch.float32),
        ("q4g128", "cuda", torch.float32, torch.float32),
    ):
        assert compiled.wide_dtype(as_recipe(recipe), dtype, device) == want, (recipe, device, dtype)
    quant_gemm("0")
    assert compiled.wide_dtype(as_recipe("q4g128"), torch.float32, "cpu") == torch.float32


def test_kernel_name_says_which_prefill_runs(cpp, quant_gemm, monkeypatch):
    quant_gemm("0")
    assert kernel_name("auto", "q4g128", "cpu").endswith(" (prefill fp32)")
    assert "prefill" not in kernel_name("auto", "bf16", "cpu")  # lossless: always exact
    _fake_cpu(monkeypatch, bf16=True, amx=False)
    quant_gemm(None)
    want = "bf16" if compiled.quant_gemm()[0] == torch.bfloat16 else "fp32"
    assert kernel_name("auto", "q2g64", "cpu").endswith(f" (prefill {want})")
    assert kernel_name("torch", "q2g64", "cpu") == "torch"


@pytest.mark.parametrize("recipe", RECIPES)
def test_many_token_products_within_the_bound(bf16_cpu, quant_gemm, monkeypatch, recipe):
    """Every recipe family, odd widths (a 4096 + one group row; a handful of groups; 37 rows), all rows and a
    subset, strided inputs, one block and several, every CPU code path: SQNR >= BF16_SQNR_DB against the
    reference, and below the exact paths' (so bf16 really ran); MOEPACK_CPU_BF16=0 is exact again."""
    from moepack.codecs import as_recipe

    lib = bf16_cpu.load()
    group = as_recipe(recipe).group
    g = torch.Generator().manual_seed(sum(map(ord, recipe)))
    before = lib.isa()
    try:
        for cols in (4096 + group, 5 * group):
            shape = (37, cols)
            parts = encode(torch.randn(*shape, generator=g), recipe)
            rows = torch.randperm(37, generator=g)[:23]
            for isa in lib.isas():
                lib.set_isa(isa)
                for tile in (compiled._TILE_ELEMS, 1000):  # 1000: 32-row blocks, so 37 rows take two
                    monkeypatch.setattr(compiled, "_TILE_ELEMS", tile)
                    for T, r in ((9, None), (40, rows)):
                        n = 37 if r is None else 23
                        x = torch.randn(T, 2 * cols, generator=g)[:, ::2]  # column stride 2
                        h = torch.randn(n, T, generator=g).T  # a transposed view
                        for op, inp in ((matmul, x), (matmul_t, h)):
                            ref = op(inp.contiguous(), parts, recipe, shape, r, backend=Backend.TORCH)
                            s = sqnr_db(op(inp, parts, recipe, shape, r, backend=Backend.CPP), ref)
                            assert BF16_SQNR_DB <= s < 80, f"{isa} {op.__name__} cols={cols} T={T}: {s:.1f} dB"
                            if tile == 1000 and T == 40:
                                quant_gemm("0")
                                got = op(inp, parts, recipe, shape, r, backend=Backend.CPP)
                                assert _rel_err(got, ref) < REL_TOL, f"{isa} {op.__name__} exact"
                                quant_gemm(None)
    finally:
        lib.set_isa(before)


@pytest.mark.parametrize("recipe", ["bf16", "fp16", "fp32"])
def test_lossless_weights_stay_exact(bf16_cpu, recipe):
    """Passthrough weights with float32 inputs above FUSED_MAX_T tokens: float32 products, bf16 prefill on."""
    g = torch.Generator().manual_seed(8)
    shape = (37, 160)
    parts = encode(torch.randn(*shape, generator=g), recipe)
    dense = decode(parts, recipe, shape)
    rows = torch.tensor([36, 0, 5])
    for T in (9, 64):
        x, h = torch.randn(T, 160, generator=g), torch.randn(T, 3, generator=g)
        assert _rel_err(matmul(x, parts, recipe, shape, backend="cpp"), x @ dense.T) < REL_TOL
        assert _rel_err(matmul_t(h, parts, recipe, shape, rows, backend="cpp"), h @ dense[rows]) < REL_TOL


def test_prepared_projections_bind_the_choice(bf16_cpu, quant_gemm):
    """The runtime's bound ops (prepared.Projection) resolve the prefill dtype when bound: bf16 within the
    bound when on, exact when bound with MOEPACK_CPU_BF16=0; few tokens never change."""
    g = torch.Generator().manual_seed(9)
    shape = (64, 4096 + 128)
    parts = encode(torch.randn(*shape, generator=g), "q4g128")
    dense = decode(parts, "q4g128", shape)
    x, h = torch.randn(100, shape[1], generator=g), torch.randn(100, 64, generator=g)
    fast = Projection(parts, "q4g128", shape, Backend.AUTO, torch.device("cpu"))
    quant_gemm("0")
    exact = Projection(parts, "q4g128", shape, Backend.AUTO, torch.device("cpu"))
    for got, ref in ((fast.mm(x), x @ dense.T), (fast.mm_t(h), h @ dense)):
        assert BF16_SQNR_DB <= sqnr_db(got, ref) < 80
    assert _rel_err(exact.mm(x), x @ dense.T) < REL_TOL and _rel_err(exact.mm_t(h), h @ dense) < REL_TOL
    assert _rel_err(fast.mm_t(h[:3]), h[:3] @ dense) < REL_TOL  # 3 tokens: the exact fused kernel


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequant_to_bf16_is_the_reference_rounded_on_every_path(cpp, bits):
    """The many-token path's dequantiser (vpermw over a per-group bf16 table on AVX-512, the shared kernel
    elsewhere) gives the reference decode rounded to nearest even, bit for bit: every code value (random
    bytes), groups of 32/64/128, a 4096 + one group width, all rows and a subset with repeats."""
    lib = cpp.load()
    before = lib.isa()
    try:
        for group in (32, 64, 128):
            g = torch.Generator().manual_seed(100 * bits + group)
            rows_n, cols = 37, 4096 + group
            parts = {"codes": torch.randint(0, 256, (rows_n, cols * bits // 8), generator=g, dtype=torch.uint8),
                     "scale": (torch.randn(rows_n, cols // group, generator=g) * 0.05).half(),
                     "zero": (torch.rand(rows_n, cols // group, generator=g) * (2**bits - 1)).half()}
            ref = decode(parts, f"q{bits}g{group}", (rows_n, cols)).bfloat16()
            rows = torch.tensor([36, 0, 5, 5, 17])
            for isa in lib.isas():
                lib.set_isa(isa)
                for r, want in ((None, ref), (rows, ref[rows])):
                    got = lib.qdequant(parts["codes"], parts["scale"], parts["zero"], r, bits, group, cols, True)
                    assert got.dtype == torch.bfloat16 and torch.equal(got, want), (isa, group, r is None)
    finally:
        lib.set_isa(before)


@pytest.mark.parametrize("recipe", ["q4g64", "q2g64", "q4g128d", "q2g64d", "q3g64d"])
@pytest.mark.parametrize("cols", [100, 200, 2880])
def test_dequant_to_bf16_ragged_and_8bit_metadata(cpp, recipe, cols):
    """Ragged last groups and q{b}g{G}d metadata (format version 2) through the bf16 dequantiser on every
    ISA path: the reference decode rounded to bf16, bit for bit (the AVX-512 table kernel hands these to the
    shared kernel)."""
    from moepack.kernels.compiled import quant_args

    lib = cpp.load()
    before = lib.isa()
    r = as_recipe(recipe)
    parts = encode(torch.randn(19, cols, generator=torch.Generator().manual_seed(cols)), recipe)
    ref = decode(parts, recipe, (19, cols)).bfloat16()
    c, s, z, q = quant_args(parts, torch.device("cpu"))
    try:
        for isa in lib.isas():
            lib.set_isa(isa)
            got = lib.qdequant(c, s, z, None, r.bits, r.group, cols, True, q)
            assert torch.equal(got, ref), (isa, recipe, cols)
    finally:
        lib.set_isa(before)


def test_dequant_into_a_reused_buffer(cpp):
    """qdequant(..., out=buf) writes the first n rows of a larger buffer (what the blocked path reuses across
    blocks) and returns them; a buffer of the wrong dtype or width is refused with a message."""
    lib = cpp.load()
    g = torch.Generator().manual_seed(12)
    parts = encode(torch.randn(40, 256, generator=g), "q4g64")
    c, s, z = parts["codes"], parts["scale"], parts["zero"]
    ref = decode(parts, "q4g64", (40, 256))
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        buf = torch.full((64, 256), 7.0, dtype=dtype)
        got = lib.qdequant(c[8:40], s[8:40], z[8:40], None, 4, 64, 256, bf16, out=buf)
        assert got.data_ptr() == buf.data_ptr() and got.shape == (32, 256)
        assert torch.equal(got, ref[8:40].to(dtype)) and bool((buf[32:] == 7).all())
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU bfloat16"):
        lib.qdequant(c, s, z, None, 4, 64, 256, True, out=torch.empty(40, 256))
    with pytest.raises(RuntimeError, match="out must be"):
        lib.qdequant(c, s, z, None, 4, 64, 256, False, out=torch.empty(40, 128))
