"""The CPP and CUDA backends: thin wrappers over the compiled ops `qmatmul`, `qmatmul_t`, `qdequant`.

Both extensions register the same op signatures (namespaces `moepack_cpu` and `moepack_cuda`) for
group-quantised matrices (q2/q3/q4, any group that is a multiple of 32). Up to FUSED_MAX_T tokens run
the fused dequantise-and-multiply kernels; more tokens amortise a dequantisation well, so those
dequantise a block of rows at a time and use the BLAS matmul.
"""

from __future__ import annotations

import torch

from moepack.codecs.recipe import Recipe
from moepack.kernels._build import LazyExtension

FUSED_MAX_T = 8
_TILE_ELEMS = 1 << 21  # fp32 elements per dequantised block (8 MiB)


def supports(recipe: Recipe) -> bool:
    """Recipes whose base product the compiled kernels compute (low-rank terms are added in torch)."""
    return recipe.quantized and not recipe.sparse


def _qparts(parts: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(parts[k].to(device).contiguous() for k in ("codes", "scale", "zero"))


def _row_blocks(n: int, cols: int, rows: torch.Tensor | None):
    """(i0, i1, rows[i0:i1] or None) for blocks of about _TILE_ELEMS dequantised weights."""
    step = max(32, _TILE_ELEMS // max(cols, 1))
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        yield i0, i1, (rows[i0:i1] if rows is not None else None)


def matmul(ext: LazyExtension, x: torch.Tensor, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None):
    """x [T, cols] float32 -> x @ W[rows].T [T, n] float32."""
    ops = ext.load()
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
