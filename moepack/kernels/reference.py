"""The TORCH backend: decode with the codec reference (`moepack.codecs.decode`), then multiply.

It defines the numbers every other backend is tested against. A row subset is decoded alone: every part
except `lr_v` has one row per matrix row, so slicing the parts and decoding `[len(rows), cols]` is the
same as decoding everything and selecting rows.
"""

from __future__ import annotations

import torch

from moepack.codecs.recipe import Recipe

# Parts whose first dimension is the matrix row (docs/architecture.md, "Codecs").
ROW_PARTS = frozenset({"values", "codes", "scale", "zero", "gscale", "gzero", "rowq", "nm_index", "lr_u"})


def select_rows(parts: dict[str, torch.Tensor], rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The parts of W[rows] (lr_v, shared by all rows, is kept whole)."""
    if rows is None:
        return parts
    return {k: (v.index_select(0, rows) if k in ROW_PARTS else v) for k, v in parts.items()}


def decode_base(parts: dict[str, torch.Tensor], recipe: Recipe, n: int, cols: int) -> torch.Tensor:
    """W[rows] of the base codec (N:M and quant or passthrough, no low-rank term) as float32 [n, cols]."""
    from moepack.codecs import decode  # the codec package imports this module's users lazily too

    base = {k: v for k, v in parts.items() if k not in ("lr_u", "lr_v")}
    return decode(base, recipe, (n, cols), dtype=torch.float32)


def matmul(x: torch.Tensor, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None) -> torch.Tensor:
    """x [T, cols] float32 -> x @ W_base[rows].T [T, n]."""
    sub = select_rows(parts, rows)
    n = next(iter(v for k, v in sub.items() if k in ROW_PARTS)).shape[0]
    w = decode_base(sub, recipe, n, cols).to(x.device)
    return x @ w.T


def matmul_t(h: torch.Tensor, parts, recipe: Recipe, cols: int, rows: torch.Tensor | None) -> torch.Tensor:
    """h [T, n] float32 -> h @ W_base[rows] [T, cols]."""
    sub = select_rows(parts, rows)
    n = h.shape[1]
    w = decode_base(sub, recipe, n, cols).to(h.device)
    return h @ w
