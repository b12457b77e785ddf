"""End-to-end tuning of the `auto` adaptive settings: how much per-expert and per-layer error a model absorbs.

The profiler measures each expert's FloE selection error and each layer's big-little drop error, relative to
that expert's or layer's own output. How much of that reaches the logits depends on the model: on the
trained toy model a 7% relative error per expert (keep 0.5) cost +0.25% perplexity, on a random-weight model
about the same error (keep 0.8) cost +2.7% (benchmarks/bench_prefetch.py, 2026-12-02). So the targets of
runtime/adaptive.py are scaled per model by one factor, chosen here on the calibration text:

    scale = the largest of TUNE_SCALES whose worst case stays within TUNE_KL nats/token of the exact model
            (if even the smallest is over, halved up to TUNE_BELOW times), then refined by TUNE_REFINE
            geometric bisections towards the first scale over it

where the worst case runs every approximation at once: FloE at the scaled sparse target, and every token
whose little share reaches the scaled *fallback* threshold running only its little set (as if each of its
big experts were always missing). A run falls back only on misses, so the runtime's error is below this.
No scale within the budget: 0, and `auto` turns the approximations off for that model."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moepack.runtime.adaptive import (
    FALLBACK_ERROR,
    SPARSE_ERROR,
    AdaptiveCalibration,
    big_little_mask,
    channel_mask,
    little_share,
    reweight,
)
from moepack.runtime.expert_compute import ExpertTerms

TUNE_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TUNE_BELOW = 2  # halvings below the grid when its smallest scale is over the budget (a model with little slack)
# nats/token, worst case on the calibration text: half the KL that the 2% perplexity aim allows, because the
# calibration text is not the user's and other text costs more at the same settings (2026-12-03: toy model at
# a budget of 0.02, worst case 0.0196 on the calibration text, then 0.024 on valid.txt while running, +2.6%
# perplexity; random model at 0.015, 0.0120 -> 0.0167 on its own samples, +2.7%). Both bench models' choices
# are in docs/benchmarks.md ("prefetch").
TUNE_KL = 0.01
TUNE_TOKENS = 512  # calibration tokens the tuning forwards run over
TUNE_REFINE = 2  # bisections between the last scale within the budget and the first over it: within 2^(1/4)


class ApproximateExecutor:
    """Experts read from the checkpoint layer by layer (like the profiler), computed with FloE at per-expert
    keep fractions and big-little at per-layer thresholds; with neither, exactly."""

    def __init__(self, load: Callable[[int, int], dict[str, torch.Tensor]], num_experts: int,
                 keep: dict | None = None, threshold: dict | None = None, terms: ExpertTerms | None = None):
        self.load, self.num_experts = load, num_experts
        self.terms = terms or ExpertTerms.plain()  # the family's expert biases and nonlinearity
        self.keep, self.threshold = keep or {}, threshold or {}

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        active = torch.ones_like(topk_ids, dtype=torch.bool)
        if layer in self.threshold:
            _, active = big_little_mask(topk_weights, self.threshold[layer], little_share(topk_weights))
            topk_weights = reweight(topk_weights, active)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = ((topk_ids == e) & active).nonzero(as_tuple=True)
            if len(tok) == 0:
                continue
            w = {p: t.to(x.dtype) for p, t in self.load(layer, e).items()}
            xe = x[tok]
            t, key = self.terms, (layer, e)
            u = t.up_factor(key, xe @ w["up"].T)
            h = t.gate_act(key, xe @ w["gate"].T) * u
            keep = self.keep.get((layer, e), 1.0)
            if keep < 1.0:  # each token its own channels, as the runtime chooses them
                h = h * channel_mask(u, keep)
            out.index_add_(0, tok, t.out(key, h @ w["down"]) * topk_weights[tok, slot, None].to(x.dtype))
            del w  # one expert in memory at a time, as in the profiler
        return out


def tune_scale(model, load, num_experts: int, calib: AdaptiveCalibration, windows: torch.Tensor,
               *, scales=TUNE_SCALES, budget: float = TUNE_KL,
               refine: int = TUNE_REFINE, terms: ExpertTerms | None = None) -> tuple[float, list[tuple[float, float]]]:
    """(chosen scale, [(scale, worst-case KL nats/token), ...] sorted by scale) for `model` (a MoeModel whose
    executor is replaced here) on calibration `windows` [B, T]; `terms`: the family's expert biases and
    nonlinearity (None: silu(g) * u)."""
    saved = model.executor
    try:
        model.executor = ApproximateExecutor(load, num_experts, terms=terms)
        ref = torch.log_softmax(model.forward(windows).float(), -1)

        def worst_kl(s: float) -> float:
            model.executor = ApproximateExecutor(load, num_experts, calib.keep(s * SPARSE_ERROR),
                                                 calib.share_threshold(s * FALLBACK_ERROR), terms)
            logp = torch.log_softmax(model.forward(windows).float(), -1)
            return float((ref.exp() * (ref - logp)).sum(-1).mean())

        return search_scale(worst_kl, scales, budget, refine)
    finally:
        model.executor = saved


def search_scale(worst_kl: Callable[[float], float], scales=TUNE_SCALES, budget: float = TUNE_KL,
                 refine: int = TUNE_REFINE, below: int = TUNE_BELOW) -> tuple[float, list[tuple[float, float]]]:
    """(the largest scale up to the first over `budget`, every (scale, KL) tried, sorted): the whole grid for
    the record (and up to `below` halvings under it when even its smallest scale is over), then `refine`
    geometric bisections between the last pass and the first failure."""
    curve = [(s, worst_kl(s)) for s in scales]
    chosen, over = 0.0, None
    for s, kl in curve:
        if kl > budget:
            over = s
            break
        chosen = s
    for _ in range(below if chosen == 0 and over is not None else 0):
        s = over / 2
        kl = worst_kl(s)
        curve.append((s, kl))
        if kl <= budget:
            chosen = s
            break
        over = s
    if chosen > 0 and over is not None:  # a factor-2 grid can land up to 2x short of the budget
        lo, hi = chosen, over
        for _ in range(refine):
            mid = (lo * hi) ** 0.5
            kl = worst_kl(mid)
            curve.append((mid, kl))
            lo, hi = (mid, hi) if kl <= budget else (lo, mid)
        chosen = lo
    return chosen, sorted(curve)
