"""moepack.kernels: the CPP backend against the TORCH reference, backend selection and fallbacks.

Tolerances (moepack/kernels/check.py states the same bounds for `moepack doctor`):
  * exact paths (decoded weights bit-identical to the codec reference, only the fp32 accumulation order
    differs): max|diff| / max|ref| < 1e-5;
  * the integer GEMV (q2/q4 products of up to 8 tokens with int8 activations, one scale per 32 values):
    SQNR against the reference >= 35 dB (Gaussian inputs give about 43 dB);
  * quantised products of more than 8 tokens in bf16 (CPUs with AVX-512 BF16 or AMX, unless
    MOEPACK_CPU_BF16=0): SQNR >= 45 dB (tests/test_kernels_bf16.py; exactness with the variable at 0).
Every CPU code path this machine can run is tested (`isa` fixture), so an AVX-512 machine still tests the
AVX2 and generic code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from moepack.codecs import as_recipe, decode, encode
from moepack.errors import KernelUnavailableError
from moepack.kernels import Backend, compiled, matmul, matmul_t, ops, resolve_backend
from moepack.kernels._build import CPP as CPP_EXT
from moepack.kernels._build import CppExtension
from moepack.kernels.check import BF16_SQNR_DB, EXACT_SQNR_DB, Q8_SQNR_DB, sqnr_db

REL_TOL = 1e-5
ROWS, COLS = 48, 384  # 384 = 3 groups of 128, 12 of 32
ISAS = ("avx512_vnni", "avx512", "avx2", "generic")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def _random_quant(bits: int, group: int, seed: int, rows: int = ROWS, cols: int = COLS):
    """Random parts (every byte pattern is a valid bitstream), so all code values are exercised."""
    g = torch.Generator().manual_seed(seed)
    parts = {
        "codes": torch.randint(0, 256, (rows, cols * bits // 8), generator=g, dtype=torch.uint8),
        "scale": (torch.rand(rows, cols // group, generator=g) * 0.1 + 1e-3).half(),
        "zero": (torch.rand(rows, cols // group, generator=g) * (2**bits - 1)).half(),
    }
    return parts, f"q{bits}g{group}", (rows, cols), g


@pytest.fixture(scope="module")
def cpp():
    if not CPP_EXT.available():
        pytest.skip(f"C++ kernels unavailable here: {CPP_EXT._error or CPP_EXT.disabled_reason()}")
    return CPP_EXT


@pytest.fixture(params=ISAS)
def isa(request, cpp):
    """Each CPU code path this machine runs, set for the test and restored after it."""
    lib = cpp.load()
    if request.param not in lib.isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    before = lib.isa()
    lib.set_isa(request.param)
    yield request.param
    lib.set_isa(before)


@pytest.fixture(params=[2, 1, 0], ids=["int8x2", "int8", "fp32"])
def q8(request, cpp):
    """Products of up to 8 tokens with int8 activations in two planes (the default) or one, and with the exact
    fp32 kernels; the value is the number of planes in force (0 where the path has no integer GEMV)."""
    lib = cpp.load()
    before = lib.set_q8(request.param)
    yield int(lib.q8())
    lib.set_q8(before)


def _assert_close(got, ref, planes: int, what: str, bf16: bool = False) -> None:
    assert got.shape == ref.shape and got.dtype == torch.float32, what
    if planes or bf16:
        bound = Q8_SQNR_DB[planes] if planes else BF16_SQNR_DB
        assert sqnr_db(got, ref) >= bound, f"{what}: {sqnr_db(got, ref):.1f} dB"
    else:
        assert _rel_err(got, ref) < REL_TOL, f"{what}: {_rel_err(got, ref):.2e}"


@pytest.mark.parametrize("use_rows", [False, True], ids=["all", "rows"])
@pytest.mark.parametrize("T", [1, 3, 6, 17])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpp_matches_torch(isa, q8, bits, group, T, use_rows):
    parts, recipe, shape, g = _random_quant(bits, group, seed=1000 * bits + 10 * group + T)
    rows = torch.randperm(ROWS, generator=g)[:19] if use_rows else None
    n = 19 if use_rows else ROWS
    x = torch.randn(T, COLS, generator=g)
    h = torch.randn(T, n, generator=g)
    for op, inp in ((matmul, x), (matmul_t, h)):
        ref = op(inp, parts, recipe, shape, rows, backend=Backend.TORCH)
        got = op(inp, parts, recipe, shape, rows, backend=Backend.CPP)
        planes = q8 if op is matmul and bits != 3 and T <= compiled.FUSED_MAX_T else 0
        bf16 = T > compiled.FUSED_MAX_T and compiled.quant_gemm()[0] == torch.bfloat16
        _assert_close(got, ref, planes, f"{isa} {op.__name__} {recipe} T={T} rows={use_rows}", bf16)


@pytest.mark.parametrize("cols", [32, 96, 160, 416, 4096 + 32])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_odd_widths_and_strided_inputs(isa, q8, bits, cols):
    """Widths that leave a partial vector of codes at the end of a row (masked or copied tails), fresh
    random inputs that are strided views (a column slice, a transpose), all token counts of the fused path."""
    parts, recipe, shape, g = _random_quant(bits, 32, seed=cols + bits, rows=37, cols=cols)
    rows = torch.randint(0, 37, (23,), generator=g)
    for T in (1, 2, 5, 8):
        x = torch.randn(T, 2 * cols, generator=g)[:, ::2]  # column stride 2
        h = torch.randn(23, T, generator=g).T  # a transposed view
        ref = matmul(x.contiguous(), parts, recipe, shape, rows, backend="torch")
        _assert_close(matmul(x, parts, recipe, shape, rows, backend="cpp"), ref, q8 if bits != 3 else 0,
                      f"{isa} matmul {recipe} cols={cols} T={T}")
        ref_t = matmul_t(h.contiguous(), parts, recipe, shape, rows, backend="torch")
        _assert_close(matmul_t(h, parts, recipe, shape, rows, backend="cpp"), ref_t, 0,
                      f"{isa} matmul_t {recipe} cols={cols} T={T}")


def test_int8_error_on_real_weights_and_large_activations(cpp, isa):
    """Encoded (not random-code) weights, activations with outliers (a heavy-tailed row): the int8 path
    still meets the stated SQNR floor, and switching it off gives the exact result."""
    g = torch.Generator().manual_seed(77)
    shape = (64, 1024)
    lib = cpp.load()
    for recipe in ("q4g128", "q2g64", "q4g32"):
        parts = encode(torch.randn(*shape, generator=g), recipe)
        x = torch.randn(3, 1024, generator=g) * torch.exp(torch.randn(3, 1024, generator=g))
        ref = matmul(x, parts, recipe, shape, backend="torch")
        before = lib.set_q8(0)
        try:
            for planes in (2, 1, 0):
                lib.set_q8(planes)
                bound = Q8_SQNR_DB[planes] if lib.q8() else EXACT_SQNR_DB
                assert sqnr_db(matmul(x, parts, recipe, shape, backend="cpp"), ref) >= bound, (isa, recipe, planes)
        finally:
            lib.set_q8(before)


def test_isa_dispatch_and_forcing(cpp):
    """The best path is chosen by default; MOEPACK_CPU_ISA forces a lower one in a fresh process; an
    unknown or unsupported name is refused with the list of what this CPU runs."""
    lib = cpp.load()
    names = list(lib.isas())
    assert names[-1] == "generic" and set(names) <= set(ISAS)
    assert names == [i for i in ISAS if i in names]  # best first
    with pytest.raises(RuntimeError, match="unknown ISA"):
        lib.set_isa("sse9")
    forced = "avx2" if "avx2" in names else "generic"
    code = "import torch; from moepack.kernels._build import CPP; print(CPP.load().isa())"
    env = {**os.environ, "MOEPACK_CPU_ISA": forced}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == forced, res.stderr
    missing = [i for i in ISAS if i not in names]
    if missing:
        with pytest.raises(RuntimeError, match="cannot run"):
            lib.set_isa(missing[0])
    code = textwrap.dedent(
        """
        import warnings
        from moepack.kernels import Backend, resolve_backend
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert resolve_backend("auto", "q4g64", "cpu") is Backend.TORCH
        assert len(w) == 1 and "unknown ISA" in str(w[0].message), [str(x.message) for x in w]
        print("ok")
        """
    )
    env = {**os.environ, "MOEPACK_CPU_ISA": "sse9"}  # a bad value: one warning, the TORCH reference
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpp_dequant_is_bit_exact(cpp, isa, bits):
    parts, recipe, shape, g = _random_quant(bits, 64, seed=bits)
    rows = torch.tensor([7, 0, 47, 7])
    full = decode(parts, recipe, shape)
    base = as_recipe(recipe)
    assert torch.equal(compiled.dequantize(cpp, parts, base, COLS, None, "cpu"), full)
    assert torch.equal(compiled.dequantize(cpp, parts, base, COLS, rows, "cpu"), full[rows])


def test_large_t_path_in_several_blocks(cpp, monkeypatch, exact_prefill):
    monkeypatch.setattr(compiled, "_TILE_ELEMS", 1000)  # 32-row blocks: 48 rows -> 2 blocks
    parts, recipe, shape, g = _random_quant(4, 32, seed=7)
    rows = torch.randperm(ROWS, generator=g)[:40]
    x, h = torch.randn(12, COLS, generator=g), torch.randn(12, 40, generator=g)
    for op, inp, r in ((matmul, x, None), (matmul, x, rows), (matmul_t, h, rows)):
        ref = op(inp, parts, recipe, shape, r, backend="torch")
        assert _rel_err(op(inp, parts, recipe, shape, r, backend="cpp"), ref) < REL_TOL


def test_encoded_lowrank_and_half_inputs(cpp):
    """A real encode with a low-rank residual; bf16 input, result in bf16, AUTO picks CPP."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g)
    recipe, shape = "q2g64+r8", (64, 256)
    parts = encode(w, recipe)
    dense = decode(parts, recipe, shape)
    assert resolve_backend("auto", recipe, "cpu") is Backend.CPP
    x = torch.randn(2, 256, generator=g)
    rows = torch.tensor([3, 60, 9])
    y = matmul(x, parts, recipe, shape, rows)
    assert sqnr_db(y, x @ dense[rows].T) >= Q8_SQNR_DB[2]  # int8 activations in two planes (or exact)
    h = torch.randn(2, 3, generator=g)
    assert _rel_err(matmul_t(h, parts, recipe, shape, rows), h @ dense[rows]) < REL_TOL
    yb = matmul(x.bfloat16(), parts, recipe, shape)
    assert yb.dtype == torch.bfloat16
    assert _rel_err(yb.float(), x.bfloat16().float() @ dense.T) < 1e-2  # bf16 output rounding


@pytest.mark.parametrize("T", [1, 3, 8, 17])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cpp_passthrough_matches_torch(cpp, isa, dtype, T):
    """bf16/fp16 passthrough through the widening kernels (fused up to 8 tokens, blocked BLAS above), all
    rows and a row subset, on fresh random inputs; also a row-strided view (what a slot or a pack holds)."""
    g = torch.Generator().manual_seed(100 + T)
    shape = (ROWS, COLS)
    parts = encode(torch.randn(*shape, generator=g), dtype)
    assert resolve_backend("auto", dtype, "cpu") is Backend.CPP
    rows = torch.randperm(ROWS, generator=g)[:19]
    x = torch.randn(T, COLS, generator=g)
    for r in (None, rows):
        h = torch.randn(T, ROWS if r is None else 19, generator=g)
        for op, inp in ((matmul, x), (matmul_t, h)):
            ref = op(inp, parts, dtype, shape, r, backend=Backend.TORCH)
            got = op(inp, parts, dtype, shape, r, backend=Backend.CPP)
            assert got.shape == ref.shape and _rel_err(got, ref) < REL_TOL, f"{op.__name__} {dtype} T={T}"
    wide = torch.randn(ROWS, COLS + 64, generator=g).to(parts["values"].dtype)
    view = {"values": wide[:, 32:32 + COLS]}  # row stride COLS + 64
    assert _rel_err(matmul(x, view, dtype, shape, backend="cpp"), x @ view["values"].float().T) < REL_TOL
    ops_ = cpp.load()
    assert _rel_err(ops_.pmatmul(x, view["values"], None), x @ view["values"].float().T) < REL_TOL


def test_cpp_passthrough_odd_width_and_errors(cpp):
    """A width that is not a multiple of 32 takes the blocked path; the raw op refuses it clearly."""
    g = torch.Generator().manual_seed(21)
    shape = (10, 40)
    parts = encode(torch.randn(*shape, generator=g), "bf16")
    x, h = torch.randn(2, 40, generator=g), torch.randn(2, 10, generator=g)
    assert _rel_err(matmul(x, parts, "bf16", shape, backend="cpp"), x @ parts["values"].float().T) < REL_TOL
    assert _rel_err(matmul_t(h, parts, "bf16", shape, backend="cpp"), h @ parts["values"].float()) < REL_TOL
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpp.load().pmatmul(x, parts["values"], None)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        cpp.load().pmatmul(torch.randn(1, 64), torch.randn(4, 64), None)


@pytest.mark.parametrize("recipe", ["fp32", "fp16+r4", "2:4+q4g32", "2:4+fp16"])
def test_other_recipes_match_the_reference(recipe):
    """fp32 passthrough is a plain matmul on any backend; N:M has no compiled kernel (AUTO uses TORCH and an
    explicit CPP says why); a low-rank term is added in torch to whatever computed the base."""
    g = torch.Generator().manual_seed(5)
    shape = (32, 128)
    parts = encode(torch.randn(*shape, generator=g), recipe)
    dense = decode(parts, recipe, shape)
    x, rows = torch.randn(3, 128, generator=g), torch.tensor([31, 2])
    assert _rel_err(matmul(x, parts, recipe, shape, rows), x @ dense[rows].T) < REL_TOL
    h = torch.randn(3, 2, generator=g)
    assert _rel_err(matmul_t(h, parts, recipe, shape, rows), h @ dense[rows]) < REL_TOL
    if "2:4" in recipe:
        assert resolve_backend("auto", recipe, "cpu") is Backend.TORCH
        with pytest.raises(KernelUnavailableError, match="N:M"):
            matmul(x, parts, recipe, shape, backend="cpp")
    else:
        assert _rel_err(matmul(x, parts, recipe, shape, rows, backend="cpp"), x @ dense[rows].T) < REL_TOL


def test_empty_rows_and_bad_rows():
    parts, recipe, shape, _ = _random_quant(4, 32, seed=9)
    x = torch.randn(2, COLS)
    none = torch.tensor([], dtype=torch.long)
    assert matmul(x, parts, recipe, shape, none).shape == (2, 0)
    assert matmul_t(torch.randn(2, 0), parts, recipe, shape, none).shape == (2, COLS)
    with pytest.raises(IndexError):
        matmul(x, parts, recipe, shape, torch.tensor([ROWS]))
    with pytest.raises(ValueError):
        matmul(torch.randn(2, COLS + 1), parts, recipe, shape)


def test_explicit_backend_errors(monkeypatch):
    parts, recipe, shape, _ = _random_quant(4, 32, seed=11)
    x = torch.randn(1, COLS)
    with pytest.raises(KernelUnavailableError, match="cuda"):
        matmul(x, parts, recipe, shape, backend="cuda")
    with pytest.raises(KernelUnavailableError, match="unknown kernel backend"):
        matmul(x, parts, recipe, shape, backend="tpu")
    monkeypatch.setenv("MOEPACK_DISABLE_CPP", "1")
    with pytest.raises(KernelUnavailableError, match="MOEPACK_DISABLE_CPP"):
        matmul(x, parts, recipe, shape, backend=Backend.CPP)
    assert resolve_backend("auto", recipe, "cpu") is Backend.TORCH


def test_auto_falls_back_when_disabled_by_env():
    """A fresh process with MOEPACK_DISABLE_CPP=1 never builds, picks TORCH, and refuses explicit CPP."""
    code = textwrap.dedent(
        """
        import warnings, torch
        warnings.simplefilter("error")
        from moepack.errors import KernelUnavailableError
        from moepack.kernels import Backend, matmul, resolve_backend
        parts = {"codes": torch.randint(0, 256, (8, 64), dtype=torch.uint8),
                 "scale": torch.full((8, 2), 0.01).half(), "zero": torch.full((8, 2), 7.0).half()}
        assert resolve_backend("auto", "q4g64", "cpu") is Backend.TORCH
        x = torch.randn(2, 128)
        ref = matmul(x, parts, "q4g64", (8, 128), backend="torch")
        assert torch.equal(matmul(x, parts, "q4g64", (8, 128)), ref)
        try:
            matmul(x, parts, "q4g64", (8, 128), backend="cpp")
        except KernelUnavailableError as e:
            assert "MOEPACK_DISABLE_CPP" in str(e)
        else:
            raise SystemExit("explicit CPP did not raise")
        assert not any("moepack_cpu" in p for p in torch.ops.loaded_libraries)  # never built
        print("ok")
        """
    )
    env = {**os.environ, "MOEPACK_DISABLE_CPP": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_build_failure_is_reported_once_and_auto_falls_back(monkeypatch):
    broken = CppExtension()

    def fail() -> None:
        raise RuntimeError("Error building extension 'moepack_cpu': x.cpp:1: error: no compiler today")

    monkeypatch.setattr(broken, "_build", fail)
    monkeypatch.setitem(ops._EXTENSIONS, Backend.CPP, broken)
    monkeypatch.setitem(ops._REGISTRY, Backend.CPP, ops._compiled_impl(Backend.CPP, broken, "cpu"))
    parts, recipe, shape, _ = _random_quant(2, 32, seed=13)
    x = torch.randn(1, COLS)
    with pytest.warns(RuntimeWarning, match="no compiler today") as record:
        y = matmul(x, parts, recipe, shape)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: no second warning
        assert torch.equal(matmul(x, parts, recipe, shape), y)
    assert torch.equal(y, matmul(x, parts, recipe, shape, backend="torch"))
    with pytest.raises(KernelUnavailableError, match="no compiler today"):
        matmul(x, parts, recipe, shape, backend="cpp")


@pytest.mark.parametrize("bits", [2, 4])
def test_cpp_dequant_to_bf16_rounds_like_torch(cpp, isa, bits):
    """The bf16 output of the dequantiser is the reference decode rounded to nearest even, bit for bit."""
    parts, recipe, shape, g = _random_quant(bits, 32, seed=40 + bits)
    ref = decode(parts, recipe, shape).bfloat16()
    got = cpp.load().qdequant(parts["codes"], parts["scale"], parts["zero"], None, bits, 32, COLS, True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


@pytest.mark.parametrize("recipe", ["q4g64", "bf16"])
def test_bf16_inputs_multiply_many_tokens_in_bf16(cpp, recipe):
    """A bf16 input above FUSED_MAX_T tokens uses the bf16 GEMM: within bf16 rounding of the float32 reference
    (relative error < 1e-2, for products of 384 terms); few tokens stay on the exact fused kernels."""
    g = torch.Generator().manual_seed(50)
    shape = (ROWS, COLS)
    parts = encode(torch.randn(*shape, generator=g), recipe)
    rows = torch.randperm(ROWS, generator=g)[:19]
    for T in (3, 24):
        x = torch.randn(T, COLS, generator=g).bfloat16()
        h = torch.randn(T, 19, generator=g).bfloat16()
        for op, inp, r in ((matmul, x, None), (matmul, x, rows), (matmul_t, h, rows)):
            ref = op(inp.float(), parts, recipe, shape, r, backend="torch")
            got = op(inp, parts, recipe, shape, r, backend="cpp")
            assert got.dtype == torch.bfloat16
            assert _rel_err(got.float(), ref) < 1e-2, f"{op.__name__} T={T}"
