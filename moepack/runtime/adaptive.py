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
masked out, so a token's result does not depend on its batch."""

from __future__ import annotations

import math

import torch

from moepack.errors import MoepackError


def parse_fraction(value, what: str) -> float | None:
    """'off' / None / 0 -> None; otherwise a float in (0, 1]."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("off", "none", "", "no"):
            return None
        try:
            value = float(value)
        except ValueError:
            raise MoepackError(f"{what} takes 'off' or a number in (0, 1], not {value!r}") from None
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise MoepackError(f"{what} takes 'off' or a number in (0, 1], not {value}")
    return value


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


def select_channels(u: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """up(x) [T, I] -> (rows [n] sorted int64: channels computed, mask [T, n] or None: each token's own).
    Every token keeps its ceil(keep * I) channels of largest |up|."""
    t, inter = u.shape
    n = max(1, math.ceil(keep * inter))
    idx = u.abs().topk(n, dim=1).indices  # [T, n]
    if t == 1:
        return idx[0].sort().values, None
    chosen = torch.zeros(t, inter, dtype=torch.bool, device=u.device).scatter_(1, idx, True)
    rows = chosen.any(0).nonzero().squeeze(1)
    return rows, chosen[:, rows]


def row_runs(rows: list[int]) -> int:
    """Number of contiguous runs in sorted channel ids (each is one byte range per part of gate and down)."""
    return sum(1 for i, r in enumerate(rows) if i == 0 or r != rows[i - 1] + 1)
