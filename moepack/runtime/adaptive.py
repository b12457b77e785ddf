"""Adaptive execution: MoBiLE big-little routing and FloE contextual channel sparsity.

**Big-little (MoBiLE).** Every token's top-k experts are the "big" set; the first half (the k/2 largest router
weights, at least one) is the "little" set. A token is judged unimportant, and runs only its little set, when
the little set already carries a share `>= threshold` of its top-k router weight:

    share = sum(w[:k/2]) / sum(w[:k])

Why this signal: the executor's output is sum_j w_j y_j, and replacing it by the little set rescaled to the same
total weight changes it by exactly (1 - share) * (mean of the little outputs - mean of the dropped outputs,
each weighted); so the error is proportional to 1 - share, and the signal costs nothing (the router has already
computed the weights). The little set's weights are rescaled to the top-k total (renormalised to 1 where the
family renormalises top-k). Threshold 1.0 never drops (share < 1 unless the dropped weights are zero).

Under a budget, MoBiLE also lets an important token fall back to its little set when a big expert is not
resident (and prefetches it). Since the error of dropping is proportional to 1 - share, the fallback is
restricted to tokens with share >= a second threshold (`fallback`, below the big-little one): tokens whose
big experts carry much of their weight always wait for them. On the trained toy model an unrestricted
fallback cost +2-3.5% perplexity at small budgets (benchmarks/bench_prefetch.py).

**Contextual sparsity (FloE).** For a token x, up(x) [I] is computed in full first; the channels with the
largest |up(x)| are predicted active (silu(gate) * up is small where up is small) and only those rows of gate
and down are computed (`rows=` in the kernels). `keep` is the fraction of channels kept per token. With
several tokens (prefill) the union of the tokens' channels is computed and each token's other channels are
masked out, so a token's result does not depend on its batch.

**`auto` settings.** A pack compressed with calibration carries what the profiler measured
(moepack/profile/profiler.py, manifest meta "adaptive"): each expert's FloE selection error at keep
fractions 0.1 .. 0.95, and each layer's c in err ~ c (1 - share)^2 (relative squared error of the layer's MoE
output when a token runs only its little half). `auto` then chooses per model, as FloE calibrates its
thresholds offline, instead of one global number:

- `--sparse-channels auto`: per expert, the keep k of the profiled grid (or 1.0, dense) that minimises
  k + (s / mean s) rel(k) / SPARSE_ERROR, with rel(k) its selection error and s what it adds to the residual
  stream per routed token (profiled `energy`): one price on absolute error for every expert, so an expert
  whose output hardly moves the hidden state gives up channels first. (Equal *relative* error per expert,
  the rule before 2026-12-03 and still the one for packs profiled without energies, spent the error where
  it costs most: on the trained toy model at the same 36% of channels it cost +1.29% perplexity, one
  uniform keep +0.25%, this rule -0.15%.)
- `--adaptive-k auto`: per layer, the share above which a token's predicted error is at most BIG_LITTLE_ERROR,
  1 - sqrt(BIG_LITTLE_ERROR / c); `--fallback auto` the same with FALLBACK_ERROR (a fallback only happens
  on a miss, so it may cost more per token)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moepack.errors import ManifestError, MoepackError

Key = tuple[int, int]
# `auto` targets, relative squared output error (see the module docstring; chosen in
# benchmarks/bench_prefetch.py on the trained toy model and the random generated one)
SPARSE_ERROR = 0.01
BIG_LITTLE_ERROR = 0.01
FALLBACK_ERROR = 0.02


def little_share(topk_weights: torch.Tensor) -> torch.Tensor:
    """[T, k] sorted router weights -> [T] share of the top-k weight carried by the first max(1, k//2)."""
    kl = max(1, topk_weights.shape[1] // 2)
    w = topk_weights.float()
    return w[:, :kl].sum(1) / w.sum(1).clamp_min(1e-30)


def big_little_mask(topk_weights: torch.Tensor, threshold: float,
                    share: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(little [T] bool: tokens that run only their little set, active [T, k] bool: slots that run);
    `share`: little_share(topk_weights) if already computed."""
    kl = max(1, topk_weights.shape[1] // 2)
    little = (little_share(topk_weights) if share is None else share) >= threshold
    active = torch.ones_like(topk_weights, dtype=torch.bool)
    active[:, kl:] &= ~little[:, None]
    return little, active


def reweight(topk_weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Zero the inactive slots and rescale each token's active weights to its original top-k total."""
    w = topk_weights.float()
    kept = torch.where(active, w, torch.zeros_like(w))
    scale = w.sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp_min(1e-30)
    return (kept * scale).to(topk_weights.dtype)


def channel_mask(u: torch.Tensor, keep: float) -> torch.Tensor:
    """up(x) [T, I] -> [T, I] bool: each token's ceil(keep * I) channels of largest |up| (FloE's rule; the
    profiler's and the tuner's estimates use it too)."""
    n = max(1, math.ceil(keep * u.shape[1]))
    return torch.zeros_like(u, dtype=torch.bool).scatter_(1, u.abs().topk(n, dim=1).indices, True)


def select_channels(u: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """up(x) [T, I] -> (rows [n] sorted int64: channels computed, mask [T, n] or None: each token's own).
    Every token keeps its ceil(keep * I) channels of largest |up| (`channel_mask`)."""
    chosen = channel_mask(u, keep)
    rows = chosen.any(0).nonzero().squeeze(1)
    return rows, (None if u.shape[0] == 1 else chosen[:, rows])


def row_runs(rows: list[int]) -> int:
    """Number of contiguous runs in sorted channel ids (each is one byte range per part of gate and down)."""
    return sum(1 for i, r in enumerate(rows) if i == 0 or r != rows[i - 1] + 1)


@dataclass(frozen=True)
class AdaptiveCalibration:
    """The profiled statistics behind `auto` (manifest meta "adaptive", written by compress)."""

    keep_grid: tuple[float, ...]
    sparse_error: dict[Key, tuple[float, ...]]  # expert -> selection error at each keep of keep_grid
    drop_error: dict[int, float]  # layer -> c of err ~ c (1 - little share)^2
    scale: float = 1.0  # factor on the targets, chosen end to end at compress time (profile/tune.py)
    sparse_weight: dict[Key, float] | None = None  # expert -> energy it adds per routed token (profiler)

    @classmethod
    def from_pack(cls, pack) -> AdaptiveCalibration:
        """The pack's calibration; MoepackError naming the pack when it has none, ManifestError when it is
        malformed."""
        return cls.from_meta(pack.manifest.meta, pack.path)

    @classmethod
    def from_meta(cls, manifest_meta: dict, path) -> AdaptiveCalibration:
        meta = manifest_meta.get("adaptive")
        if meta is None:
            raise MoepackError("'auto' adaptive settings need a pack compressed with calibration "
                               "(--target-ratio, or --recipe with --calib); this one has none", path=path)
        try:
            grid = tuple(float(k) for k in meta["keep_grid"])
            sparse = {(int(la), int(e)): tuple(float(v) for v in errs) for la, e, errs in meta["sparse_error"]}
            drop = {int(la): float(c) for la, c in meta["drop_error"]}
            scale = float(meta.get("scale", 1.0))
            weight = ({(int(la), int(e)): float(s) for la, e, s in meta["sparse_weight"]}
                      if "sparse_weight" in meta else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"meta.adaptive is malformed ({exc!r})", path=path) from None
        if any(len(v) != len(grid) for v in sparse.values()) or not all(0 < k < 1 for k in grid):
            raise ManifestError("meta.adaptive: sparse_error rows must match keep_grid, a grid of fractions in (0, 1)",
                                path=path)
        if any(not math.isfinite(v) or v < 0
               for v in [scale, *drop.values(), *(x for r in sparse.values() for x in r), *(weight or {}).values()]):
            raise ManifestError("meta.adaptive: errors, weights and scale must be finite and non-negative", path=path)
        if weight is not None and set(weight) != set(sparse):
            raise ManifestError("meta.adaptive: sparse_weight must name the experts of sparse_error", path=path)
        return cls(grid, sparse, drop, scale, weight)

    def auto(self) -> tuple[dict[int, float], dict[int, float], dict[Key, float]]:
        """(big-little thresholds, fallback thresholds, keep fractions) of `auto`: the targets times `scale`;
        scale 0 (the model absorbed no error in tuning) turns every approximation off."""
        if self.scale <= 0:
            return ({la: 1.0 for la in self.drop_error}, {la: 1.0 for la in self.drop_error},
                    dict.fromkeys(self.sparse_error, 1.0))
        return (self.share_threshold(self.scale * BIG_LITTLE_ERROR), self.share_threshold(self.scale * FALLBACK_ERROR),
                self.keep(self.scale * SPARSE_ERROR))

    def keep(self, target: float = SPARSE_ERROR) -> dict[Key, float]:
        """Per expert keep fraction (1.0: dense) at error price `target` (module docstring): the grid's k
        minimising k + (s / mean s) rel(k) / target; without profiled energies, the smallest k whose relative
        error is at most `target`."""
        if target <= 0:
            return dict.fromkeys(self.sparse_error, 1.0)
        mean = sum(self.sparse_weight.values()) / len(self.sparse_weight) if self.sparse_weight else 0.0
        if mean <= 0:
            return {key: min((k for k, e in zip(self.keep_grid, errs, strict=True) if e <= target), default=1.0)
                    for key, errs in self.sparse_error.items()}
        out = {}
        for key, errs in self.sparse_error.items():
            price = self.sparse_weight[key] / (mean * target)
            options = [(1.0, 0.0), *sorted(zip(self.keep_grid, errs, strict=True), reverse=True)]
            out[key] = min(options, key=lambda ke: ke[0] + price * ke[1])[0]  # ties: the larger keep
        return out

    def share_threshold(self, target: float) -> dict[int, float]:
        """Per layer: the little share above which dropping the big half costs at most `target`."""
        return {layer: 0.0 if c <= 0 else min(1.0, max(0.0, 1 - math.sqrt(target / c)))
                for layer, c in self.drop_error.items()}
