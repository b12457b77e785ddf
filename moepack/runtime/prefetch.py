"""Fate-style prefetch: predict the next sparse layer's experts from this layer's router input.

At layer L's routing (a `route_hooks` entry: after L's attention, before L's experts run) the router input
x [T, H] of layer L (the post-attention-normed hidden state) goes through the router of the next sparse layer
L'; its top-`width` experts per token are queued on the executor, which loads them into unpinned slots right
after issuing L's own loads (on CUDA asynchronously on the streamer's side stream, so they travel while L
computes). Prefetching only moves bytes: it never changes which experts run or the numbers.

Each prediction is scored when L' routes: per token, |predicted ∩ routed| over |predicted| (precision) and over
|routed| (recall), summed over tokens (micro averages), per layer and in total.

Gating. Every prediction is queued with a probability: the measured hit rate, so far in this run, of the
predictions of the same rank for the same layer (rank 1 = the next router's top choice; a Laplace prior of
1/2 at the start). The executor loads a prediction only when that probability reaches its
`prefetch_min_prob` and the cache policy admits it over the expert it would evict; otherwise it only hints
the policy. So a layer whose predictions miss stops prefetching by itself (and resumes if they improve, since
predictions are scored whether loaded or not), and rank-2 guesses are loaded only where they are reliable.

With a routing trace (`trace`, runtime/routing_trace.py: Klotski's correlation prefetch for many sequences)
the prediction is widened: an expert c that co-occurs in a layer step with a predicted expert b
(P(c needed | b needed) >= `co_threshold` in the trace, b seen in at least `min_steps` steps) joins with
chance(b) * P(c | b), right behind b in the order."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PredictionScore:
    """Micro-averaged precision and recall of set predictions, in total and per predicted layer."""

    hits: int = 0
    predicted: int = 0
    actual: int = 0
    per_layer: dict[int, list[int]] = field(default_factory=dict)  # layer -> [hits, predicted, actual]

    def add(self, layer: int, pred: torch.Tensor, actual: torch.Tensor) -> None:
        """pred [T, w], actual [T, k] expert ids of the same T tokens."""
        hits = int((pred[:, :, None] == actual[:, None, :]).any(-1).sum())
        n_pred, n_act = pred.numel(), actual.numel()
        self.hits += hits
        self.predicted += n_pred
        self.actual += n_act
        row = self.per_layer.setdefault(layer, [0, 0, 0])
        row[0] += hits
        row[1] += n_pred
        row[2] += n_act

    @property
    def precision(self) -> float | None:
        return self.hits / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.hits / self.actual if self.actual else None

    def layer_recall(self) -> dict[int, float]:
        return {layer: (h / a if a else 0.0) for layer, (h, _, a) in self.per_layer.items()}


class RankCalibration:
    """Hit rate of predictions per (layer, rank), with a prior of `prior_hits` / `prior_n`."""

    def __init__(self, prior_hits: float = 1.0, prior_n: float = 2.0):
        self.prior_hits, self.prior_n = prior_hits, prior_n
        self.hits: dict[tuple[int, int], float] = {}
        self.n: dict[tuple[int, int], float] = {}

    def add(self, layer: int, pred: torch.Tensor, actual: torch.Tensor) -> None:
        """pred [T, w] ranked predictions, actual [T, k] routed ids."""
        hit = (pred[:, :, None] == actual[:, None, :]).any(-1)  # [T, w]
        for r, h in enumerate(hit.sum(0).tolist()):
            key = (layer, r)
            self.hits[key] = self.hits.get(key, 0.0) + float(h)
            self.n[key] = self.n.get(key, 0.0) + pred.shape[0]

    def prob(self, layer: int, rank: int) -> float:
        key = (layer, rank)
        return (self.hits.get(key, 0.0) + self.prior_hits) / (self.n.get(key, 0.0) + self.prior_n)


class FatePrefetcher:
    """Hooks a MoeModel's routing; predictions go to `executor.queue_prefetch` (when `issue` is set) and are
    scored either way, so prediction quality can be measured without prefetching."""

    def __init__(self, model, executor, *, width: int | None = None, issue: bool = True, trace=None,
                 co_threshold: float = 0.6, min_steps: int = 32):
        self.model, self.executor, self.issue = model, executor, issue
        self.co: dict[int, torch.Tensor] = {}
        if trace is not None:
            for layer in trace.layers:
                steps = torch.from_numpy(trace.co[layer].diagonal().copy())
                co = torch.from_numpy(trace.cooccurrence(layer)).float()
                co[steps < min_steps] = 0.0
                co.fill_diagonal_(0.0)
                self.co[layer] = torch.where(co >= co_threshold, co, torch.zeros_like(co))
        spec = model.spec
        self.width = width or spec.top_k
        layers = list(spec.sparse_layer_ids)
        self.next_layer = {a: b for a, b in zip(layers, layers[1:], strict=False)}
        self.predicted: dict[int, torch.Tensor] = {}
        self.score = PredictionScore()
        self.calibration = RankCalibration()  # kept across runs: it only gets better
        model.route_hooks.append(self.on_route)

    def detach(self) -> None:
        """Stop predicting (the model's route hook is removed)."""
        if self.on_route in self.model.route_hooks:
            self.model.route_hooks.remove(self.on_route)

    def reset_counters(self) -> None:
        self.score = PredictionScore()

    def on_route(self, layer: int, x: torch.Tensor, logits: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> None:
        pred = self.predicted.pop(layer, None)
        if pred is not None and pred.shape[0] == topk_ids.shape[0]:
            self.score.add(layer, pred, topk_ids)
            self.calibration.add(layer, pred, topk_ids)
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return
        probs = torch.softmax(self.model.router_logits(nxt, x).float(), dim=-1)  # [T, E]
        top = torch.topk(probs, self.width, dim=-1)  # [T, w]
        self.predicted[nxt] = top.indices
        if self.issue:
            # each expert's chance to be used by some token: 1 - prod over the tokens predicting it of
            # (1 - that rank's hit rate); most likely first
            q = torch.tensor([1.0 - self.calibration.prob(nxt, r) for r in range(self.width)], dtype=torch.float64)
            ids = top.indices.flatten().cpu()  # token-major: rank r at every width-th place
            e = probs.shape[1]
            miss = torch.ones(e, dtype=torch.float64).scatter_reduce_(0, ids, q.repeat(top.indices.shape[0]), "prod")
            chance = 1.0 - miss
            if nxt in self.co:  # co-occurring experts join with chance(b) * P(c | b)
                chance = torch.maximum(chance, (chance[:, None] * self.co[nxt].double()).amax(0))
            mass = torch.zeros(e, dtype=torch.float64).index_add_(0, ids, top.values.flatten().double().cpu())
            ch, ms = chance.tolist(), mass.tolist()  # ties: router mass
            order = sorted((i for i in range(e) if ch[i] > 0), key=lambda i: (-ch[i], -ms[i]))
            self.executor.queue_prefetch([(nxt, i) for i in order], [ch[i] for i in order])
