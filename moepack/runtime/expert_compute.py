"""One expert's product on the tokens routed to it: dense SwiGLU, FloE's channel-sparse SwiGLU, and the two
bypass paths (the whole expert streamed past the cache; only the kept rows of gate/down read from the pack).

Projections are `prepared.Projection`s (typed views of an expert's parts bound to a kernel once); the plain
(parts, recipe, shape) tuples of older callers are accepted too and go through `moepack.kernels`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moepack.format import projection_parts
from moepack.kernels import Backend, matmul, matmul_t
from moepack.runtime.adaptive import row_runs, select_channels
from moepack.runtime.prepared import Projection


def _mm(x: torch.Tensor, proj, backend: Backend, rows: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(proj, Projection):
        return proj.mm(x, rows)
    return matmul(x, *proj, rows=rows, backend=backend)


def _mm_t(h: torch.Tensor, proj, backend: Backend, rows: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(proj, Projection):
        return proj.mm_t(h, rows)
    return matmul_t(h, *proj, rows=rows, backend=backend)


def expert_ffn(x: torch.Tensor, projs: dict, backend: Backend = Backend.AUTO) -> torch.Tensor:
    """SwiGLU expert on channel-major projections: down(silu(gate(x)) * up(x)).  x [T, H] -> [T, H]."""
    g = _mm(x, projs["gate"], backend)  # [T, I]
    u = _mm(x, projs["up"], backend)  # [T, I]
    return _mm_t(F.silu(g) * u, projs["down"], backend)  # [T, H]


def sparse_ffn(x: torch.Tensor, projs: dict, backend: Backend, keep: float) -> tuple[torch.Tensor, int]:
    """FloE: up(x) in full, then gate and down on the channels of largest |up| only. -> ([T, H], rows used)."""
    u = _mm(x, projs["up"], backend)  # [T, I]
    rows, mask = select_channels(u, keep)  # [n], [T, n] | None
    h = F.silu(_mm(x, projs["gate"], backend, rows)) * u[:, rows]  # [T, n]
    if mask is not None:
        h = h * mask
    return _mm_t(h, projs["down"], backend, rows), rows.numel()


def _rowwise(name: str) -> bool:
    return name != "lr_v"  # every part but the low-rank right factor has one row per channel


def partial_ffn(x: torch.Tensor, blob: torch.Tensor, record, keep: float, backend: Backend,
                counts) -> tuple[torch.Tensor, int]:
    """A miss under partial loads: up moves whole; gate and down only for the kept rows (each contiguous run of
    rows is one byte range per part), from the mapped `blob`. Nothing is cached. -> ([T, H], bytes moved);
    `counts` gets partial_loads / partial_runs / partial_rows / partial_bytes(_saved) / rows_kept / rows_total."""
    dev, moved = x.device, 0
    up_rec = record.projections["up"]
    up = {k: v.to(dev) for k, v in projection_parts(blob, up_rec).items()}
    moved += sum(p.nbytes for p in up_rec.parts)
    u = matmul(x, up, up_rec.recipe, up_rec.shape, backend=backend)  # [T, I]
    rows, mask = select_channels(u, keep)
    rows_cpu = rows.cpu()
    compact = {}
    for p in ("gate", "down"):
        prec = record.projections[p]
        parts = {}
        for name, t in projection_parts(blob, prec).items():
            part = t.index_select(0, rows_cpu) if _rowwise(name) else t
            parts[name] = part.to(dev)
            moved += part.numel() * part.element_size()
        compact[p] = (parts, prec.recipe, (rows.numel(), prec.shape[1]))
    h = F.silu(matmul(x, *compact["gate"], backend=backend)) * u[:, rows]
    if mask is not None:
        h = h * mask
    full = sum(p.nbytes for prec in record.projections.values() for p in prec.parts)
    counts["partial_loads"] += 1
    counts["partial_runs"] += row_runs(rows_cpu.tolist())  # contiguous reads per part of gate / down
    counts["partial_rows"] += rows.numel()
    counts["partial_bytes"] += moved
    counts["partial_bytes_saved"] += full - moved
    counts["rows_kept"] += rows.numel() * x.shape[0]
    counts["rows_total"] += up_rec.shape[0] * x.shape[0]
    return matmul_t(h, *compact["down"], backend=backend), moved
