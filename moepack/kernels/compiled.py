"""The CPP and CUDA backends: thin wrappers over the compiled ops.

Both extensions register the same op signatures `qmatmul`, `qmatmul_t`, `qdequant` (namespaces
`moepack_cpu` and `moepack_cuda`) for group-quantised matrices (q2/q3/q4, any group that is a multiple of
32). Up to FUSED_MAX_T tokens run the fused dequantise-and-multiply kernels; more tokens amortise a
dequantisation well, so those dequantise a block of rows at a time and use the BLAS matmul.

The C++ extension also serves bf16/fp16 passthrough matrices (`pmatmul`, `pmatmul_t`: weights widened to
fp32 on the fly, so no per-call upcast of the whole matrix, for rows of a multiple of 32 columns); above
FUSED_MAX_T tokens (or for other widths) those upcast a block of rows at a time and use the BLAS matmul,
as the quantised path does.
"""

from __future__ import annotations

import torch

from moepack.codecs.recipe import Recipe
from moepack.kernels._build import LazyExtension

FUSED_MAX_T = 8
_TILE_ELEMS = 1 << 21  # fp32 elements per dequantised block (8 MiB)


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


def _qparts(parts: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    out = []
    for k in ("codes", "scale", "zero"):
        t = parts[k]
        if t.device != device:
            t = t.to(device)
        out.append(t if t.is_contiguous() else t.contiguous())
    return tuple(out)


def _row_blocks(n: int, cols: int, rows: torch.Tensor | None):
    """(i0, i1, rows[i0:i1] or None) for blocks of about _TILE_ELEMS dequantised weights."""
    step = max(32, _TILE_ELEMS // max(cols, 1))
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        yield i0, i1, (rows[i0:i1] if rows is not None else None)


def matmul(ext: LazyExtension, x: torch.Tensor, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None):
    """x [T, cols] float32 -> x @ W[rows].T [T, n] float32."""
    ops = ext.load()
    if not recipe.quantized:
        return _passthrough_matmul(ops, x, parts["values"], rows)
    codes, scale, zero = _qparts(parts, x.device)
    if x.shape[0] <= FUSED_MAX_T:
        return ops.qmatmul(x, codes, scale, zero, rows, recipe.bits, recipe.group)
    n = rows.shape[0] if rows is not None else codes.shape[0]
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for i0, i1, sub in _row_blocks(n, cols, rows):
        c, s, z = (codes, scale, zero) if sub is not None else (t[i0:i1] for t in (codes, scale, zero))
        w = ops.qdequant(c, s, z, sub, recipe.bits, recipe.group, cols)  # [i1-i0, cols]
        out[:, i0:i1] = x @ w.T
    return out


def matmul_t(
    ext: LazyExtension, h: torch.Tensor, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None
):
    """h [T, n] float32 -> h @ W[rows] [T, cols] float32."""
    ops = ext.load()
    if not recipe.quantized:
        return _passthrough_matmul_t(ops, h, parts["values"], rows)
    codes, scale, zero = _qparts(parts, h.device)
    if h.shape[0] <= FUSED_MAX_T:
        return ops.qmatmul_t(h, codes, scale, zero, rows, recipe.bits, recipe.group, cols)
    n = h.shape[1]
    out = torch.zeros(h.shape[0], cols, dtype=torch.float32, device=h.device)
    for i0, i1, sub in _row_blocks(n, cols, rows):
        c, s, z = (codes, scale, zero) if sub is not None else (t[i0:i1] for t in (codes, scale, zero))
        w = ops.qdequant(c, s, z, sub, recipe.bits, recipe.group, cols)
        out.addmm_(h[:, i0:i1], w)
    return out


def dequantize(ext: LazyExtension, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None, device):
    """W_base[rows] as float32 [n, cols] on `device` through the compiled dequantiser."""
    ops = ext.load()
    codes, scale, zero = _qparts(parts, device)
    return ops.qdequant(codes, scale, zero, rows, recipe.bits, recipe.group, cols)


def _passthrough_matmul(ops, x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x [T, cols] float32 -> x @ values[rows].T; values bf16/fp16 (the kernel reads row-strided views in
    place and copies other layouts itself)."""
    values = values.to(x.device)
    if x.shape[0] <= FUSED_MAX_T and values.shape[1] % 32 == 0:
        return ops.pmatmul(x, values, rows)
    n, cols = (rows.shape[0] if rows is not None else values.shape[0]), values.shape[1]
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for i0, i1, sub in _row_blocks(n, cols, rows):
        w = values[i0:i1] if sub is None else values.index_select(0, sub)
        out[:, i0:i1] = x @ w.float().T
    return out


def _passthrough_matmul_t(ops, h: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """h [T, n] float32 -> h @ values[rows] (see _passthrough_matmul)."""
    values = values.to(h.device)
    if h.shape[0] <= FUSED_MAX_T and values.shape[1] % 32 == 0:
        return ops.pmatmul_t(h, values, rows)
    out = torch.zeros(h.shape[0], values.shape[1], dtype=torch.float32, device=h.device)
    for i0, i1, sub in _row_blocks(h.shape[1], values.shape[1], rows):
        w = values[i0:i1] if sub is None else values.index_select(0, sub)
        out.addmm_(h[:, i0:i1], w.float())
    return out
