"""Group quantisation with double-quantised metadata, `q{b}g{G}d` (codec `gqd`): the codes of `q{b}g{G}`,
with each group's scale and zero stored as 8-bit codes under three fp16 factors per row (the row is the
super-block, as llama.cpp's k-quants and QLoRA's double quantisation do for their blocks):

    s[r, j] = d_s[r] * gscale[r, j]            gscale u8 in [1, 255]
    z[r, j] = z_0[r] + d_z[r] * gzero[r, j]    gzero  u8 in [0, 255]
    w[r, c] = (q[r, c] - z[r, j]) * s[r, j]    j = c // G, the last group maybe ragged

with rowq = (d_s, z_0, d_z) fp16 [rows, 3]. Both products are exact in float32 (11 x 8 significant bits),
so every implementation gets the same s and z with one rounding (the addition), then decodes as
`gq` does. Metadata costs 16 bits per group plus 48 per row instead of 32 per group: q2g64 ~2.27 and
q4g128 ~4.14 bits per weight on 4096-wide rows.

Encoding: the `gq` fit per group (clipping search, HQQ zero, least squares), the per-row factors from
the range of its scales and zeros, then for each group the best of the 3 x 3 neighbouring codes around
the rounded ones, scored by the (importance-weighted) error they decode to.
"""

from __future__ import annotations

import torch

from moepack.codecs import quant
from moepack.codecs.bits import pack_bits

__all__ = ["dq_part_specs", "quantize_dq", "dequantize_dq", "dq_scale_zero"]


def dq_part_specs(bits: int, group: int, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple]]:
    ng = -(-cols // group)
    return [
        ("codes", torch.uint8, (rows, (cols * bits + 7) // 8)),
        ("gscale", torch.uint8, (rows, ng)),
        ("gzero", torch.uint8, (rows, ng)),
        ("rowq", torch.float16, (rows, 3)),
    ]


def dq_scale_zero(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-group (scale, zero) as float32 [rows, ng], exactly as every kernel computes them."""
    rq = parts["rowq"].float()
    s = rq[:, 0:1] * parts["gscale"].float()
    z = rq[:, 1:2] + rq[:, 2:3] * parts["gzero"].float()
    return s, z


def dequantize_dq(parts: dict[str, torch.Tensor], bits: int, group: int, shape: tuple[int, int]) -> torch.Tensor:
    """The reference decode, in float32."""
    s, z = dq_scale_zero(parts)
    return quant.dequantize({"codes": parts["codes"], "scale": s, "zero": z}, bits, group, shape)


def quantize_dq(w: torch.Tensor, bits: int, group: int, *,
                importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """w [rows, cols] -> {codes, gscale, gzero, rowq} (see the module docstring)."""
    base = quant.quantize(w, bits, group, importance=importance)
    s0, z0 = base["scale"].float(), base["zero"].float()  # [rows, ng]: the per-group fit
    w32 = quant._checked(w, bits, group)
    a = quant._importance(importance, w.shape)
    qm = (1 << bits) - 1
    d_s = (s0.amax(1, keepdim=True) / 255).half().float().clamp_min(2.0**-24)  # [rows, 1]
    z_lo = z0.amin(1, keepdim=True).half().float()
    d_z = ((z0.amax(1, keepdim=True) - z_lo) / 255).half().float()
    sc0 = (s0 / d_s).round().clamp(1, 255)
    zc0 = torch.where(d_z > 0, (z0 - z_lo) / torch.where(d_z > 0, d_z, 1.0), torch.zeros_like(z0)).round().clamp(0, 255)
    best_e = best_sc = best_zc = None
    for ds in (0, -1, 1):  # the 3 x 3 neighbourhood of the rounded codes, scored as they decode
        for dz in (0, -1, 1):
            sc, zc = (sc0 + ds).clamp(1, 255), (zc0 + dz).clamp(0, 255)
            e = _group_errors(w32, a, d_s * sc, z_lo + d_z * zc, group, qm)
            if best_e is None:
                best_e, best_sc, best_zc = e, sc, zc
            else:
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_sc, best_zc = torch.where(better, sc, best_sc), torch.where(better, zc, best_zc)
    s, z = d_s * best_sc, z_lo + d_z * best_zc
    q = torch.cat([quant._codes(wg, ss.unsqueeze(-1), zz.unsqueeze(-1), qm).to(torch.uint8).reshape(w32.shape[0], -1)
                   for wg, ss, zz in zip(quant._segments(w32, group), *_split(s, z, w32.shape[1], group),
                                         strict=True)], dim=1)
    return {
        "codes": pack_bits(q, bits),
        "gscale": best_sc.to(torch.uint8).contiguous(),
        "gzero": best_zc.to(torch.uint8).contiguous(),
        "rowq": torch.cat([d_s, z_lo, d_z], dim=1).half().contiguous(),
    }


def _split(s: torch.Tensor, z: torch.Tensor, cols: int, group: int) -> tuple[list, list]:
    """Per-group [rows, ng] tensors split like quant._segments: whole groups, then the ragged one."""
    nf = cols // group
    cut = [t for t in ((0, nf), (nf, s.shape[1])) if t[1] > t[0]]
    return [s[:, a:b] for a, b in cut], [z[:, a:b] for a, b in cut]


def _group_errors(w32, a, s, z, group: int, qm: int) -> torch.Tensor:
    """Weighted squared error per group [rows, ng] of decoding with float32 (s, z) [rows, ng]."""
    segs = quant._segments(w32, group)
    a_segs = [None] * len(segs) if a is None else quant._segments(a, group)
    ss, zs = _split(s, z, w32.shape[1], group)
    out = [quant._score(wg, sg.unsqueeze(-1), zg.unsqueeze(-1), qm, ag).squeeze(-1)
           for wg, ag, sg, zg in zip(segs, a_segs, ss, zs, strict=True)]
    return torch.cat(out, dim=1)
