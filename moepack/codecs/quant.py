"""Group-wise asymmetric INT2/3/4 quantisation: `w = (q - zero) * scale`, one (scale, zero) per group
of G consecutive columns in a row, both stored as fp16, codes packed by `bits.pack_bits`. A row of any
length has ceil(cols/G) groups: when G does not divide cols the last group is ragged (cols % G columns,
fitted on those alone; nothing padded is stored).

`quantize` chooses (scale, zero) per group to minimise the importance-weighted squared error
sum_j a_j (w_j - w^_j)^2 (a = per-column importance, e.g. mean squared activation):
  1. clipping search: shrink the [min, max] range by a few ratios, keep the best per group;
  2. HQQ-style half-quadratic refinement of the zero point (Badri & Shaji 2023): an l_p (p < 1)
     shrinkage of the error followed by a closed-form (weighted-mean) zero update;
  3. alternating least squares: for fixed codes, (scale, zero) have a closed form; re-round; repeat.
Every candidate is scored with its fp16-rounded scale and zero, and each group keeps its best, so the
result is never worse than min/max round-to-nearest (`quantize_rtn`, the benchmark baseline).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from moepack.codecs.bits import pack_bits, unpack_bits
from moepack.errors import CodecError

__all__ = ["quantize", "quantize_rtn", "dequantize", "quant_part_specs", "CLIP_RATIOS"]

CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7)
HQQ_ITERS = 3
HQQ_P, HQQ_BETA, HQQ_KAPPA = 0.7, 10.0, 1.01  # HQQ's defaults, beta scaled to the code domain below
LS_ITERS = 3
_S_MIN = 2.0**-24  # smallest positive fp16 (subnormal): a stored scale is never 0
_Z_MAX = 65000.0  # inside fp16's finite range
_CHUNK = 1 << 18  # elements per row chunk in `quantize` (1 MB of float32)


def quant_part_specs(bits: int, group: int, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, dtype, shape) of the parts, in payload order."""
    return [
        ("codes", torch.uint8, (rows, (cols * bits + 7) // 8)),
        ("scale", torch.float16, (rows, -(-cols // group))),
        ("zero", torch.float16, (rows, -(-cols // group))),
    ]


def quantize_rtn(w: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Plain min/max round-to-nearest (the baseline); same parts as `quantize`."""
    fits = []
    for wg in _segments(_checked(w, bits, group), group):  # [rows, ng, G], then a ragged group
        s, z = _minmax_scale_zero(wg, (1 << bits) - 1, 1.0)
        fits.append((wg, s, z))
    return _finish(fits, bits)


def quantize(
    w: torch.Tensor, bits: int, group: int, *, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """w [rows, cols] -> {codes uint8 [rows, ceil(cols*bits/8)], scale fp16 [rows, ng], zero fp16 [rows, ng]}
    with ng = ceil(cols / group).

    importance: [cols] or [rows, cols] non-negative weights of the squared error (None: uniform).
    """
    w32 = _checked(w, bits, group)
    a = _importance(importance, w.shape)  # [1 or rows, cols] or None
    qm = (1 << bits) - 1
    fits = []
    segs = _segments(w32, group)
    a_segs = [None] * len(segs) if a is None else _segments(a, group)
    for wg, ag in zip(segs, a_segs, strict=True):  # full groups, then the ragged one
        s_all, z_all = [], []
        # ~1 MB row chunks keep the dozens of elementwise passes in cache; they are too small to gain from
        # intra-op threads, whose per-op sync made this 5-15x slower on a loaded 2-core host (measured).
        # Parallelise across matrices instead (they are independent). Same bytes either way.
        step = max(1, _CHUNK // (wg.shape[1] * wg.shape[2]))
        with _single_intraop_thread():
            for r0 in range(0, wg.shape[0], step):
                ac = ag if ag is None or ag.shape[0] == 1 else ag[r0 : r0 + step]
                s, z = _fit(wg[r0 : r0 + step], qm, ac)
                s_all.append(s)
                z_all.append(z)
        fits.append((wg, torch.cat(s_all), torch.cat(z_all)))
    return _finish(fits, bits)


def _fit(wg: torch.Tensor, qm: int, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best fp16-representable (scale, zero) [rows, ng, 1] for grouped weights wg [rows, ng, G]."""
    best_s, best_z = _minmax_scale_zero(wg, qm, CLIP_RATIOS[0])
    best_e = _score(wg, best_s, best_z, qm, a)
    for ratio in CLIP_RATIOS[1:]:  # 1. clipping search
        s, z = _minmax_scale_zero(wg, qm, ratio)
        best_s, best_z, best_e = _keep_best(wg, s, z, qm, a, best_s, best_z, best_e)
    s, z = best_s, best_z
    beta = HQQ_BETA
    for _ in range(HQQ_ITERS):  # 2. half-quadratic zero refinement (scale fixed), in the code domain
        wn = wg / s  # weights in code units, so beta does not depend on the weight magnitude
        q = torch.round(wn + z).clamp_(0, qm)
        err = wn - q + z
        # e = shrink_p(err): the l_p (p<1) proximal step that lets outliers keep their error
        e = err.abs()
        e = torch.sign(err).mul_(torch.relu_(e - (e + 1e-8).pow_(HQQ_P - 1).div_(beta)))
        z = _wmean(q.sub_(wn).add_(e), a)  # zero = mean(q - (w/s - e))
        beta *= HQQ_KAPPA
        s, z = _round16(s, z)
        best_s, best_z, best_e = _keep_best(wg, s, z, qm, a, best_s, best_z, best_e)
    s, z = best_s, best_z
    for _ in range(LS_ITERS):  # 3. alternating least squares on (scale, zero) for fixed codes
        s, z = _lsq_fit(wg, _codes(wg, s, z, qm), a, s, z)
        best_s, best_z, best_e = _keep_best(wg, s, z, qm, a, best_s, best_z, best_e)
    return best_s, best_z


def dequantize(parts: dict[str, torch.Tensor], bits: int, group: int, shape: tuple[int, int]) -> torch.Tensor:
    """The reference decode, in float32: w = (q - zero) * scale."""
    rows, cols = shape
    q = unpack_bits(parts["codes"], bits, cols)  # [rows, cols]
    z = parts["zero"].float().repeat_interleave(group, dim=1)[:, :cols]  # [rows, cols]: a ragged last group
    s = parts["scale"].float().repeat_interleave(group, dim=1)[:, :cols]
    return (q.float() - z) * s


_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 1


@contextmanager
def _single_intraop_thread():
    """torch.set_num_threads(1) for the scope; nesting- and thread-safe, restores the caller's count."""
    global _threads_depth, _threads_saved
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_depth += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0:
                torch.set_num_threads(_threads_saved)


# --- helpers (all on grouped views [rows, ng, G]; s, z are [rows, ng, 1] float32) ------------------
def _checked(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] == 0:
        raise CodecError(f"quantize expects a 2-D matrix with columns, got shape {tuple(w.shape)}")
    if bits not in (2, 3, 4) or group <= 0:
        raise CodecError(f"quantize: bits {bits} / group {group} invalid for shape {tuple(w.shape)}")
    if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
        raise CodecError("quantize: weights must be finite floating point")
    return w.detach().to("cpu", torch.float32)


def _segments(t: torch.Tensor, group: int) -> list[torch.Tensor]:
    """[r, cols] -> its whole groups [r, cols // G, G] and the ragged last group [r, 1, cols % G], each
    only when it has columns."""
    r, cols = t.shape
    full = cols // group * group
    segs = [t[:, :full].reshape(r, full // group, group), t[:, full:].reshape(r, 1, cols - full)]
    return [seg for seg in segs if seg.shape[1] and seg.shape[2]]


def _importance(imp: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """The importance as float32 [1 or rows, cols], scaled to mean 1 and floored (or None)."""
    if imp is None:
        return None
    rows, cols = shape
    if imp.shape not in ((cols,), (rows, cols)):
        raise CodecError(f"importance must have shape [{cols}] or [{rows}, {cols}], got {tuple(imp.shape)}")
    a = imp.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise CodecError("importance must be finite and non-negative")
    a = a / a.mean().clamp_min(1e-30)  # scale-free; a tiny floor keeps every group's fit well posed
    a = a.clamp_min(1e-6) if a.max() > 0 else torch.ones_like(a)
    return a.reshape(-1, cols)


def _minmax_scale_zero(wg: torch.Tensor, qm: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero mapping the group's [min, max], shrunk by `ratio` about its centre, onto [0, qm]."""
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    if ratio != 1.0:
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
        lo, hi = mid - half, mid + half
    # floor the range so |zero| = |lo|/scale stays inside fp16 even for a narrow, offset group
    span = torch.maximum(hi - lo, torch.maximum(lo.abs(), hi.abs()) * 2.0**-12)
    s, _ = _round16(span / qm, lo)  # zero from the scale fp16 will hold, not the exact one
    return _round16(s, -lo / s)


def _round16(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to what fp16 storage will hold, so candidates are scored as they will decode."""
    s = s.nan_to_num(nan=_S_MIN).clamp(_S_MIN, 65504.0).half().float()
    z = z.nan_to_num(nan=0.0).clamp(-_Z_MAX, _Z_MAX).half().float()
    return s, z


def _codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qm: int) -> torch.Tensor:
    return torch.div(wg, s).add_(z).round_().clamp_(0, qm)  # float codes [rows, ng, G]


def _score(wg, s, z, qm, a) -> torch.Tensor:
    """Weighted squared error per group [rows, ng, 1] of decoding with (s, z)."""
    r = _codes(wg, s, z, qm).sub_(z).mul_(s).sub_(wg).square_()
    if a is not None:
        r.mul_(a)
    return r.sum(-1, keepdim=True)


def _keep_best(wg, s, z, qm, a, best_s, best_z, best_e):
    e = _score(wg, s, z, qm, a)
    better = e < best_e
    return torch.where(better, s, best_s), torch.where(better, z, best_z), torch.where(better, e, best_e)


def _wmean(x: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    if a is None:
        return x.mean(-1, keepdim=True)
    return (x * a).sum(-1, keepdim=True) / a.sum(-1, keepdim=True)


def _lsq_fit(wg, q, a, s_old, z_old) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares of w ~ s*q + b per group; zero = -b/s. Degenerate groups keep the old fit."""
    mq, mw = _wmean(q, a), _wmean(wg, a)
    dq = q - mq
    var = _wmean(dq * dq, a)
    cov = _wmean(dq * (wg - mw), a)
    s = cov / var.clamp_min(1e-12)
    ok = (var > 1e-6) & (s > _S_MIN)
    z = mq - mw / torch.where(ok, s, torch.ones_like(s))
    s, z = _round16(torch.where(ok, s, s_old), torch.where(ok, z, z_old))
    return s, z


def _finish(fits: list, bits: int) -> dict[str, torch.Tensor]:
    """Parts from the fitted segments [(wg [rows, ng, G], s, z [rows, ng, 1]), ...] in column order."""
    rows = fits[0][0].shape[0]
    q = torch.cat([_codes(wg, s, z, (1 << bits) - 1).to(torch.uint8).reshape(rows, -1) for wg, s, z in fits], 1)
    return {
        "codes": pack_bits(q, bits),  # [rows, cols] codes
        "scale": torch.cat([s.squeeze(-1) for _, s, _ in fits], 1).half().contiguous(),
        "zero": torch.cat([z.squeeze(-1) for _, _, z in fits], 1).half().contiguous(),
    }
