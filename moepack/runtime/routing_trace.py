"""Routing traces: which experts tokens route to, counted per sparse layer, for the planner and the prefetcher.

A trace keeps, per sparse layer l (E experts, top-k):
  * `counts[l][e]`   tokens routed to expert e            -> q_e = counts / tokens, P(a token uses e); sum = k
  * `co[l][a, b]`    layer steps in which a and b were both needed (diagonal: steps that needed a); a
                     "layer step" is one call of the experts of a layer, i.e. the stacked tokens of every batch
                     in flight, so this is the co-occurrence *across batches* the prefetcher groups by
  * `trans[l][a, b]` tokens that used a at layer l and b at the next sparse layer

Only numpy and torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class RoutingTrace:
    co_max_tokens = 64  # layer steps with more tokens (prefill chunks) do not count towards `co`

    def __init__(self, sparse_layers: list[int] | tuple[int, ...], num_experts: int, top_k: int):
        self.layers, self.num_experts, self.top_k = list(sparse_layers), num_experts, top_k
        e = num_experts
        self.counts = {layer: np.zeros(e, np.int64) for layer in self.layers}
        self.tokens = dict.fromkeys(self.layers, 0)
        self.co = {layer: np.zeros((e, e), np.int64) for layer in self.layers}
        self.trans = {layer: np.zeros((e, e), np.int64) for layer in self.layers}
        self._next = {a: b for a, b in zip(self.layers, self.layers[1:], strict=False)}
        self._prev: tuple[int, np.ndarray] | None = None

    @classmethod
    def for_spec(cls, spec) -> RoutingTrace:
        return cls(spec.sparse_layer_ids, spec.num_experts, spec.top_k)

    def next_layer(self, layer: int) -> int | None:
        return self._next.get(layer)

    # -- recording ---------------------------------------------------------------------------------
    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """One layer step: topk_ids [N, k] of the N tokens routed together."""
        ids = topk_ids.detach().cpu().numpy().astype(np.int64)
        n = ids.shape[0]
        np.add.at(self.counts[layer], ids.ravel(), 1)
        self.tokens[layer] += n
        if n <= self.co_max_tokens:  # a prefill chunk needs nearly every expert: no co-occurrence signal
            used = np.zeros(self.num_experts, bool)
            used[ids.ravel()] = True
            self.co[layer] += np.outer(used, used)
        prev = self._prev
        if prev is not None and self._next.get(prev[0]) == layer and prev[1].shape[0] == n:
            rows = np.repeat(prev[1], ids.shape[1], axis=1).ravel()  # every (a, b) pair of each token
            cols = np.tile(ids, (1, prev[1].shape[1])).ravel()
            np.add.at(self.trans[prev[0]], (rows, cols), 1)
        self._prev = (layer, ids)

    def hook(self, layer: int, x, logits, topk_ids, topk_weights) -> None:
        """A `MoeModel.route_hooks` entry."""
        self.record(layer, topk_ids)

    # -- statistics ----------------------------------------------------------------------------------
    def token_probs(self, layer: int) -> np.ndarray:
        """q_e: probability that a token routes to e (uniform k/E before any token was seen)."""
        t = self.tokens[layer]
        if t == 0:
            return np.full(self.num_experts, self.top_k / self.num_experts)
        return self.counts[layer] / t

    def cooccurrence(self, layer: int) -> np.ndarray:
        """P(b needed in a layer step | a needed in it) [E, E] (0 where a was never needed)."""
        co = self.co[layer].astype(np.float64)
        diag = np.diag(co)[:, None]
        return np.divide(co, diag, out=np.zeros_like(co), where=diag > 0)

    def transition(self, layer: int) -> np.ndarray:
        """P(token uses b at the next sparse layer | it used a at `layer`) [E, E], rows sum to k (or 0)."""
        tr = self.trans[layer].astype(np.float64)
        used = self.counts[layer][:, None].astype(np.float64)
        return np.divide(tr, used, out=np.zeros_like(tr), where=used > 0)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    # -- persistence ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "counts": {str(k): v.tolist() for k, v in self.counts.items()},
                "tokens": {str(k): v for k, v in self.tokens.items()},
                "co": {str(k): v.tolist() for k, v in self.co.items()},
                "trans": {str(k): v.tolist() for k, v in self.trans.items()}}

    @classmethod
    def from_json(cls, obj: dict) -> RoutingTrace:
        t = cls(obj["layers"], obj["num_experts"], obj["top_k"])
        for layer in t.layers:
            t.counts[layer] = np.asarray(obj["counts"][str(layer)], np.int64)
            t.tokens[layer] = int(obj["tokens"][str(layer)])
            t.co[layer] = np.asarray(obj["co"][str(layer)], np.int64)
            t.trans[layer] = np.asarray(obj["trans"][str(layer)], np.int64)
        return t

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        return cls.from_json(json.loads(Path(path).read_text()))


def profiled_popularity(pack) -> dict[tuple[int, int], float] | None:
    """Per expert, the profiled probability that a token routes to it (its share of the layer's routed slots
    times top-k), from the manifest; None if the pack was not profiled."""
    recs = pack.manifest.experts
    if not recs or any(r.frequency is None for r in recs):
        return None
    return {(r.layer, r.expert): r.frequency * pack.spec.top_k for r in recs}


def manifest_trace(pack) -> RoutingTrace | None:
    """A trace holding only the profiled routing frequencies of the manifest (None if not profiled)."""
    popularity = profiled_popularity(pack)
    if popularity is None:
        return None
    spec = pack.spec
    trace = RoutingTrace.for_spec(spec)
    scale = 1_000_000
    for layer in trace.layers:
        f = np.array([popularity.get((layer, e), 0.0) for e in range(spec.num_experts)], np.float64)
        total = f.sum()
        if total <= 0:
            continue
        trace.counts[layer] = np.round(f / total * spec.top_k * scale).astype(np.int64)
        trace.tokens[layer] = scale
    return trace


@torch.inference_mode()
def collect_trace(model, prompts: list[list[int]], *, max_new_tokens: int = 16) -> RoutingTrace:
    """Run `prompts` (token ids) one by one through a MoePackModel (greedy) and record their routing."""
    trace = RoutingTrace.for_spec(model.spec)
    hooks = model.model.route_hooks
    hooks.append(trace.hook)
    try:
        for ids in prompts:
            trace._prev = None
            model.generate(ids, max_new_tokens=max_new_tokens, stop_at_eos=False)
    finally:
        hooks.remove(trace.hook)
    return trace
