"""The CPP and CUDA backends: thin wrappers over the compiled ops.

Both extensions register the same op signatures `qmatmul`, `qmatmul_t`, `qdequant` (namespaces
`moepack_cpu` and `moepack_cuda`) for group-quantised matrices (q2/q3/q4, any group that is a multiple of
32, rows of any length: a ragged last group is read as stored, never padded into a copy). Up to FUSED_MAX_T tokens run the fused kernels; more tokens amortise a dequantisation well, so
those dequantise a block of rows at a time and use the BLAS matmul (prefill).

On the CPU the library picks the best code path the processor has when it loads (avx512_vnni, avx512,
avx2, generic: `torch.ops.moepack_cpu.isa()`; MOEPACK_CPU_ISA or `set_isa` choose a lower one). There,
q2/q4 products of up to FUSED_MAX_T tokens quantise each token's activations per block of 32 values to
two int8 planes (about 15 bits; MOEPACK_CPU_Q8=1 keeps one plane, as llama.cpp's q8 activations, 0 the
fp32 kernels) and use integer dot products (vpdpbusd with VNNI); kernels/check.py states the error
bounds. matmul_t and the dequantiser decode weights bit-exactly.

The C++ extension also serves bf16/fp16 passthrough matrices (`pmatmul`, `pmatmul_t`: weights widened to
fp32 on the fly, so no per-call upcast of the whole matrix, for rows of a multiple of 32 columns); above
FUSED_MAX_T tokens (or for other widths) those use the blocked BLAS path too.

The blocked path multiplies in `wide`: float32 (weights decoded or widened exactly), or bfloat16: a bf16
pack's block is then used as stored, a quantised block is dequantised straight to bf16 (rounded to nearest),
and torch's bf16 GEMM (float32 accumulation) runs it, which on CPUs with bf16 dot products is several times
faster. `wide_dtype` is the one rule: bf16 inputs multiply in bf16; float32 inputs multiply quantised
(lossy) weights in bf16 too where `quant_gemm()` says so (the CPU has AVX-512 BF16 or AMX, and
MOEPACK_CPU_BF16 is not 0), since the weights are an approximation already; passthrough (lossless) weights
in float32 compute stay exact. kernels/check.py states the error bound (BF16_SQNR_DB).
"""

from __future__ import annotations

import functools
import os

import torch

from moepack.codecs.recipe import Recipe
from moepack.kernels._build import LazyExtension

FUSED_MAX_T = 8
_TILE_ELEMS = 1 << 21  # float32 elements per dequantised block (8 MiB; a bf16 block holds twice as many)
BF16_ENV = "MOEPACK_CPU_BF16"


PASSTHROUGH_DTYPES = {"cpu": frozenset({"bf16", "fp16"}), "cuda": frozenset()}  # fused passthrough kernels


def supports(recipe: Recipe, device_type: str = "cpu") -> bool:
    """Recipes whose base product the compiled kernels for `device_type` compute (low-rank terms are added in
    torch): group quantisation without N:M on both; bf16/fp16 passthrough on the CPU only."""
    if recipe.sparse:
        return False
    return recipe.quantized or recipe.dtype in PASSTHROUGH_DTYPES.get(device_type, ())


def describe(device_type: str) -> str:
    """What `supports` accepts, in words (for error messages)."""
    quant = "group quantisation q2/q3/q4 without N:M"
    dtypes = sorted(PASSTHROUGH_DTYPES.get(device_type, ()))
    return f"{quant} and {'/'.join(dtypes)} passthrough" if dtypes else quant


@functools.cache
def quant_gemm() -> tuple[torch.dtype, str]:
    """(dtype, why): what the CPU's blocked path (more than FUSED_MAX_T tokens: prefill) multiplies quantised
    weights in for float32 inputs. bfloat16 where the CPU has bf16 dot products (AVX-512 BF16 or AMX) and
    torch's bf16 GEMM runs on oneDNN, unless MOEPACK_CPU_BF16=0; else float32 (exact). Decided once per
    process (`quant_gemm.cache_clear()` after changing the variable)."""
    from moepack.errors import KernelUnavailableError

    raw = os.environ.get(BF16_ENV, "").strip().lower()
    if raw not in ("", "0", "1", "auto"):
        raise KernelUnavailableError(f"{BF16_ENV} must be 0 (float32 products) or 1 (bf16 where the CPU has "
                                     f"bf16 dot products), got {raw!r}")
    if raw == "0":
        return torch.float32, f"float32 ({BF16_ENV}=0)"
    isa = [name for name, probe in (("avx512-bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported"))
           if getattr(torch.cpu, probe, lambda: False)()]
    if not isa:
        return torch.float32, "float32 (this CPU has no AVX-512 BF16 or AMX)"
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe
        onednn = False
    if not onednn:
        return torch.float32, "float32 (torch's oneDNN has no bf16 GEMM here)"
    return torch.bfloat16, f"bfloat16 ({'+'.join(isa)}; {BF16_ENV}=0 for float32)"


def wide_dtype(recipe: Recipe, dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the blocked path of the CPP/CUDA backends multiplies `recipe`'s weights in, for inputs of
    `dtype` (see the module docstring)."""
    if dtype == torch.bfloat16:
        return torch.bfloat16
    if device_type == "cpu" and recipe.quantized and not recipe.sparse:
        return quant_gemm()[0]
    return torch.float32


def quant_args(parts: dict[str, torch.Tensor], device: torch.device) -> tuple:
    """(codes, scale, zero, rowq) as the compiled ops take them, contiguous on `device`: for double-quantised
    metadata (`q{b}g{G}d`) scale and zero are the u8 codes `gscale`, `gzero` and rowq the fp16 row factors
    (the kernels compute each group's scale and zero as they go); otherwise rowq is None."""
    keys = ("codes", "gscale", "gzero", "rowq") if "rowq" in parts else ("codes", "scale", "zero")
    out = []
    for k in keys:
        t = parts[k]
        if t.device != device:
            t = t.to(device)
        out.append(t if t.is_contiguous() else t.contiguous())
    return tuple(out) if len(out) == 4 else (*out, None)


def _block_rows(cols: int, wide: torch.dtype) -> int:
    """Rows per block: about 8 MiB of dequantised weights (_TILE_ELEMS in fp32), at least 32."""
    return max(32, _TILE_ELEMS * 4 // wide.itemsize // max(cols, 1))


def _row_blocks(n: int, cols: int, rows: torch.Tensor | None, wide: torch.dtype = torch.float32):
    """(i0, i1, rows[i0:i1] or None) for blocks of _block_rows rows."""
    step = _block_rows(cols, wide)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        yield i0, i1, (rows[i0:i1] if rows is not None else None)


def _block_reader(ops, parts, recipe: Recipe, cols: int, device: torch.device, wide: torch.dtype):
    """(n rows of the whole matrix, read(i0, i1, sub) -> W[rows][i0:i1] as `wide` [i1-i0, cols]). On the CPU a
    quantised block is dequantised into one buffer per call, valid until the next read (a fresh multi-MiB
    tensor per block would be new pages each time: page faults cost as much as the dequantisation)."""
    if not recipe.quantized:
        values = parts["values"].to(device)

        def read(i0, i1, sub):
            w = values[i0:i1] if sub is None else values.index_select(0, sub)
            return w if w.dtype == wide else w.to(wide)

        return values.shape[0], read
    codes, scale, zero, rowq = quant_args(parts, device)
    cpu = device.type == "cpu"  # the CUDA op has no bf16 output and no buffer
    buf: list[torch.Tensor] = []

    def read(i0, i1, sub):
        c, s, z, f = (codes, scale, zero, rowq) if sub is not None else (
            None if t is None else t[i0:i1] for t in (codes, scale, zero, rowq))
        if not cpu:
            return ops.qdequant(c, s, z, sub, recipe.bits, recipe.group, cols, rowq=f).to(wide)
        if not buf:
            buf.append(torch.empty(min(_block_rows(cols, wide), codes.shape[0] if sub is None else len(sub)),
                                   cols, dtype=wide))
        return ops.qdequant(c, s, z, sub, recipe.bits, recipe.group, cols, wide == torch.bfloat16, f, buf[0])

    return codes.shape[0], read


def _fused(recipe: Recipe, parts, tokens: int) -> bool:
    return tokens <= FUSED_MAX_T and (recipe.quantized or parts["values"].shape[1] % 32 == 0)


def matmul(ext: LazyExtension, x: torch.Tensor, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None,
           wide: torch.dtype = torch.float32):
    """x [T, cols] float32 -> x @ W[rows].T [T, n] float32."""
    ops = ext.load()
    if _fused(recipe, parts, x.shape[0]):
        if not recipe.quantized:
            return ops.pmatmul(x, parts["values"].to(x.device), rows)
        codes, scale, zero, rowq = quant_args(parts, x.device)
        return ops.qmatmul(x, codes, scale, zero, rows, recipe.bits, recipe.group, rowq)
    total, read = _block_reader(ops, parts, recipe, cols, x.device, wide)
    n = rows.shape[0] if rows is not None else total
    xw = x.to(wide)
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for i0, i1, sub in _row_blocks(n, cols, rows, wide):
        out[:, i0:i1] = xw @ read(i0, i1, sub).T
    return out


def matmul_t(ext: LazyExtension, h: torch.Tensor, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None,
             wide: torch.dtype = torch.float32):
    """h [T, n] float32 -> h @ W[rows] [T, cols] float32."""
    ops = ext.load()
    if _fused(recipe, parts, h.shape[0]):
        if not recipe.quantized:
            return ops.pmatmul_t(h, parts["values"].to(h.device), rows)
        codes, scale, zero, rowq = quant_args(parts, h.device)
        return ops.qmatmul_t(h, codes, scale, zero, rows, recipe.bits, recipe.group, cols, rowq)
    _, read = _block_reader(ops, parts, recipe, cols, h.device, wide)
    hw = h.to(wide)
    out = torch.zeros(h.shape[0], cols, dtype=torch.float32, device=h.device)
    for i0, i1, sub in _row_blocks(h.shape[1], cols, rows, wide):
        w = read(i0, i1, sub)
        if wide == torch.float32:
            out.addmm_(hw[:, i0:i1], w)
        else:
            out += hw[:, i0:i1] @ w
    return out


def dequantize(ext: LazyExtension, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None, device):
    """W_base[rows] as float32 [n, cols] on `device` through the compiled dequantiser."""
    ops = ext.load()
    codes, scale, zero, rowq = quant_args(parts, device)
    return ops.qdequant(codes, scale, zero, rows, recipe.bits, recipe.group, cols, rowq=rowq)
