"""The throughput planner: a small hardware model that predicts tokens/s of the multi-batch pipeline and
chooses the number of batches, the slot split and the hot experts kept resident (docs/planning.md).

Per sparse layer and step with t tokens in flight (each token routes to e with probability q_e, from a
routing trace or the manifest's profiled frequencies, uniform k/E otherwise):

    U = sum_e 1 - (1 - q_e)^t                    experts needed (each loaded once per layer step)
    M = sum_{e not hot} p_e (1 - r p_e)          of those, misses, p_e = 1 - (1 - q_e)^t: an expert the
                                                 last step also needed is still resident with probability
                                                 r = min(1, streaming slots / W), W = sum over layers of the
                                                 streamed experts one step needs (LRU over a layer scan)
    C = sum_e p_e * expert(t q_e / p_e) + dense(t)     compute: each needed expert runs once over its
                                                 expected tokens; expert(n) and dense(n) are curves
                                                 measured through the runtime's own executor and forward
                                                 (or expert_fixed + n * expert_token, dense_fixed + n *
                                                 dense_token when given on paper)
    X = M * expert_bytes / link                                          transfer
    layer = max(C, X) + (1 - overlap) * min(C, X)     pipelined (>= 2 streaming slots)
          = C + X                                     not pipelined (the plain runtime on the CPU)
    stall = layer - C

with t = batches x batch_size sequences in flight. A step adds t * head_token (final norm, lm_head, sampling)
and the dense layers. A run is simulated step by step with the engine's own scheduler (queue, at most one
batch's worth of prefill chunks per step, continuous refill), so prefill, tails and the sequences that ride
along a prefill step are all counted.

Light on purpose: numpy and torch only (measurement), no scipy."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from moepack.runtime.budget import PREFILL_CHUNK, MemoryNeeds, slots_left

BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Hardware:
    link_gbps: float  # GB/s (1e9 bytes) from the pack into expert slots
    expert_fixed_s: float  # one expert FFN call regardless of tokens (reading/decoding its weights)
    expert_token_s: float  # each token routed to an expert
    dense_token_s: float  # dense parts of one layer (norms, attention, router, shared expert) per token
    head_token_s: float  # final norm + lm_head + sampling per token
    overlap: float = 1.0  # share of min(compute, transfer) hidden under the other when pipelined
    dense_fixed_s: float = 0.0  # dense parts of one layer per step regardless of tokens (dispatch, weight reads)
    source: str = "given"
    # measured curves (tokens, seconds), used instead of the linear terms above when present: one expert call
    # through the runtime's executor, and the dense parts of one layer, for n tokens
    expert_curve: tuple[tuple[int, float], ...] = ()
    dense_curve: tuple[tuple[int, float], ...] = ()
    # (sequences in flight, measured / modelled compute) of the multi-batch engine with every expert resident:
    # what the per-part curves miss there (per-sequence attention, stacking, the loader thread beside compute)
    engine_scale: tuple[tuple[int, float], ...] = ()
    # (sequences in flight, overlap) fitted on streaming runs of the engine: how much of the shorter of compute
    # and transfer hides depends on how much compute a layer step has to hide a copy under (used instead of
    # `overlap` when present)
    overlap_curve: tuple[tuple[int, float], ...] = ()
    # the plain runtime (one sequence, synchronous loads): measured / modelled run time of a streaming run
    plain_scale: float = 1.0

    def to_json(self) -> dict:
        return asdict(self)

    def expert_s(self, tokens: float) -> float:
        """One expert call with `tokens` tokens."""
        if self.expert_curve:
            return _interpolate(self.expert_curve, tokens)
        return self.expert_fixed_s + tokens * self.expert_token_s

    def engine_factor(self, seqs: float) -> float:
        return _interpolate(self.engine_scale, seqs, extrapolate=False) if self.engine_scale else 1.0

    def overlap_at(self, seqs: float | None) -> float:
        if self.overlap_curve and seqs:
            return _interpolate(self.overlap_curve, seqs, extrapolate=False)
        return self.overlap

    def dense_s(self, tokens: float) -> float:
        """The dense parts of one layer (norms, attention, router, shared expert) for `tokens` tokens."""
        if self.dense_curve:
            return _interpolate(self.dense_curve, tokens)
        return self.dense_fixed_s + tokens * self.dense_token_s


def _interpolate(curve: tuple[tuple[int, float], ...], x: float, extrapolate: bool = True) -> float:
    """Piecewise linear through the measured points: the first value below them, and beyond the last the
    last segment's slope (or the last value, without `extrapolate`)."""
    pts = sorted(curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if not extrapolate or len(pts) == 1:
        return pts[-1][1]
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    sparse_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    expert_bytes: int  # one expert's payload (one slot)
    dense_bytes: int  # resident dense weights in the runtime dtype
    kv_bytes_per_token: int  # one sequence
    workspace_bytes: int
    probs: tuple[tuple[float, ...], ...] = ()  # q_e per sparse layer; () = uniform k/E
    probs_source: str = "uniform"
    transit_bytes: int = 0  # CUDA: the slot misses that skip the cache stream through

    @property
    def needs(self) -> MemoryNeeds:
        """The memory the budget function splits (runtime/budget.py)."""
        return MemoryNeeds(dense_bytes=self.dense_bytes, kv_bytes_per_token=self.kv_bytes_per_token,
                           workspace_bytes=self.workspace_bytes, transit_bytes=self.transit_bytes,
                           slot_bytes=self.expert_bytes, total_experts=self.total_experts, min_slots=self.top_k)

    @property
    def total_experts(self) -> int:
        return self.sparse_layers * self.num_experts

    def layer_probs(self) -> list[np.ndarray]:
        if self.probs:
            return [np.clip(np.asarray(p, np.float64), 0.0, 1.0) for p in self.probs]
        return [np.full(self.num_experts, self.top_k / self.num_experts)] * self.sparse_layers

    @classmethod
    def from_pack(cls, pack, *, trace=None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  backend: str = "auto", streams_misses: bool = True) -> ModelShape:
        """The pack's shape and memory needs as `run` computes them (`streams_misses`: the run's
        `RunConfig.streams_misses`, which adds a transit slot on CUDA)."""
        from moepack.runtime.routing_trace import manifest_trace

        spec = pack.spec
        src = "trace"
        if trace is None or trace.total_tokens == 0:
            trace, src = manifest_trace(pack), "manifest"
        probs: tuple = ()
        if trace is not None and trace.total_tokens > 0:
            probs = tuple(tuple(float(v) for v in trace.token_probs(layer)) for layer in trace.layers)
        else:
            src = "uniform"
        needs = MemoryNeeds.of(pack, device=torch.device(device), dtype=dtype, backend=backend,
                               streams_misses=streams_misses)
        return cls(name=pack.path.name, num_layers=spec.num_layers, sparse_layers=len(spec.sparse_layer_ids),
                   num_experts=spec.num_experts, top_k=spec.top_k, hidden=spec.hidden_size,
                   intermediate=spec.moe_intermediate_size, expert_bytes=needs.slot_bytes,
                   dense_bytes=needs.dense_bytes, kv_bytes_per_token=needs.kv_bytes_per_token,
                   workspace_bytes=needs.workspace_bytes, transit_bytes=needs.transit_bytes,
                   probs=probs, probs_source=src)

    @classmethod
    def mixtral_8x7b(cls, *, bits_per_weight: float = 16.0, kv_dtype_bytes: int = 2) -> ModelShape:
        """Published Mixtral-8x7B shapes: 32 layers, 8 experts, top-2, hidden 4096, intermediate 14336,
        8 KV heads of 128, vocab 32000; 45.1e9 expert and 1.6e9 dense parameters (dense kept in bf16)."""
        h, i, layers, e = 4096, 14336, 32, 8
        expert = int(3 * h * i * bits_per_weight / 8)
        dense_params = layers * (2 * h * h + 2 * h * 1024 + h * e + 2 * h) + 2 * 32000 * h + h
        return cls(name=f"Mixtral-8x7B ({bits_per_weight:g} bits/weight experts)", num_layers=layers,
                   sparse_layers=layers, num_experts=e, top_k=2, hidden=h, intermediate=i, expert_bytes=expert,
                   dense_bytes=dense_params * 2, kv_bytes_per_token=2 * layers * 8 * 128 * kv_dtype_bytes,
                   workspace_bytes=256 << 20)


@dataclass
class Prediction:
    batches: int
    slots: int
    hot: int
    pipelined: bool
    tokens_per_s: float  # decode, steady state
    step_s: float  # one decode step (every batch +1 token)
    compute_s: float  # per step
    transfer_s: float  # per step
    stall_s: float  # per step: time compute waits for transfers
    loads_per_step: float
    bytes_per_token: float
    run_s: float | None = None  # a simulated whole run (prefill included), when prompts were given
    run_tokens_per_s: float | None = None
    mean_latency_s: float | None = None
    memory: dict = field(default_factory=dict)
    batch_size: int = 1

    def to_json(self) -> dict:
        return asdict(self)


# --- the cost model -----------------------------------------------------------------------------------
def hot_set(shape: ModelShape, hot: int, tokens: int) -> list[tuple[int, int]]:
    """The `hot` (sparse layer index, expert) pairs most likely to be needed in a step of `tokens` tokens."""
    if hot <= 0:
        return []
    scored = [(1 - (1 - q) ** tokens, li, e) for li, qs in enumerate(shape.layer_probs()) for e, q in enumerate(qs)]
    scored.sort(reverse=True)
    return [(li, e) for _, li, e in scored[:hot]]


def layer_times(shape: ModelShape, hw: Hardware, tokens: int, hot: set, *, pipelined: bool,
                all_resident: bool = False, streaming_slots: int | None = None,
                engine_seqs: int | None = None) -> tuple[float, float, float, float]:
    """(time, compute, transfer, loads) over the layers for one step of `tokens` tokens (head excluded);
    `engine_seqs`: the multi-batch engine with that many sequences in flight (its calibration applies)."""
    # calibration factors: the engine's compute per sequences in flight; the plain runtime's whole step
    scale = hw.engine_factor(engine_seqs) if engine_seqs else hw.plain_scale
    overlap = hw.overlap_at(engine_seqs)
    per_load = shape.expert_bytes / (hw.link_gbps * 1e9) * (1.0 if engine_seqs else hw.plain_scale)
    needs = [1 - (1 - qs) ** tokens for qs in shape.layer_probs()]
    cold = [np.array([p for e, p in enumerate(need) if (li, e) not in hot]) for li, need in enumerate(needs)]
    working = sum(float(c.sum()) for c in cold)  # distinct streamed experts one step touches
    keep = 0.0 if streaming_slots is None or working <= 0 else min(1.0, streaming_slots / working)
    total = comp = xfer = loads = 0.0
    for qs, need, c_need in zip(shape.layer_probs(), needs, cold, strict=True):
        m = 0.0 if all_resident else float((c_need * (1 - keep * c_need)).sum())
        # each needed expert runs once over its tokens: t*q_e / p_e of them on average when it is needed
        calls = sum(p * hw.expert_s(tokens * q / p) for q, p in zip(qs, need, strict=True) if p > 0)
        c = (calls + hw.dense_s(tokens)) * scale
        x = m * per_load
        t = max(c, x) + (1 - overlap) * min(c, x) if pipelined else c + x
        total, comp, xfer, loads = total + t, comp + c, xfer + x, loads + m
    extra = (shape.num_layers - shape.sparse_layers) * hw.dense_s(tokens) * scale  # dense MLP layers
    return total + extra, comp + extra, xfer, loads


def slots_for(shape: ModelShape, vram: int | None, batches: int, context: int, batch_size: int = 1) -> int:
    """Expert slots left by a budget once dense weights, batches x batch_size KV caches, the workspace and
    any transit buffer are in (runtime/budget.py, as `run` computes them)."""
    return slots_left(vram, shape.needs, context=context, sequences=batches * batch_size)


def predict(shape: ModelShape, hw: Hardware, *, batches: int, slots: int, hot: int = 0, pipelined: bool = True,
            prompts: list[int] | None = None, max_new_tokens: int = 64, batch_size: int = 1,
            engine: bool = True) -> Prediction:
    """Steady-state decode prediction; with `prompts` (their lengths) also a simulated whole run. `engine`:
    the multi-batch engine (throughput mode); False: the plain runtime, one sequence (`pipelined=False`)."""
    streaming = slots - hot
    pipe = pipelined and streaming >= 2
    resident = slots >= shape.total_experts
    seqs = batches * batch_size
    hs = set(hot_set(shape, hot, seqs))
    eng = seqs if engine else None
    t, c, x, loads = layer_times(shape, hw, seqs, hs, pipelined=pipe, all_resident=resident,
                                 streaming_slots=streaming, engine_seqs=eng)
    head = seqs * hw.head_token_s
    t, c = t + head, c + head
    pred = Prediction(batches=batches, slots=slots, hot=hot, pipelined=pipe, tokens_per_s=seqs / t, step_s=t,
                      compute_s=c, transfer_s=x, stall_s=max(0.0, t - c), loads_per_step=loads,
                      bytes_per_token=loads * shape.expert_bytes / seqs, batch_size=batch_size)
    if prompts:
        pred.run_s, pred.mean_latency_s = simulate_run(shape, hw, prompts, max_new_tokens, seqs, hs,
                                                       pipelined=pipe, resident=resident, streaming_slots=streaming,
                                                       prefill_per_step=batch_size, engine=engine)
        pred.run_tokens_per_s = len(prompts) * max_new_tokens / pred.run_s
    return pred


def simulate_run(shape: ModelShape, hw: Hardware, prompts: list[int], max_new_tokens: int, in_flight: int,
                 hot: set, *, pipelined: bool, resident: bool = False, streaming_slots: int | None = None,
                 prefill_per_step: int = 1, engine: bool = True) -> tuple[float, float]:
    """(total seconds, mean per-prompt latency) following the engine's scheduler step by step, with
    `in_flight` sequences at once and at most `prefill_per_step` prompt chunks per step."""
    queue = deque(range(len(prompts)))
    active: list[list[int]] = []  # [index, prompt tokens left, tokens generated]
    now, latencies, first = 0.0, [], True
    while queue or active:
        while queue and len(active) < in_flight:
            i = queue.popleft()
            active.append([i, prompts[i], 0])
        tokens, stepping, prefills = 0, [], 0
        for s in active:
            if s[1] > 0:
                if prefills >= prefill_per_step:
                    continue
                prefills += 1
                n = min(PREFILL_CHUNK, s[1])
                s[1] -= n
                tokens += n
                stepping.append((s, n == 0 or s[1] == 0))
            else:
                tokens += 1
                stepping.append((s, True))
        t, *_ = layer_times(shape, hw, tokens, hot, pipelined=pipelined, all_resident=resident and not first,
                            streaming_slots=streaming_slots, engine_seqs=len(stepping) if engine else None)
        first = False
        now += t + len(stepping) * hw.head_token_s
        for s, emits in stepping:
            if emits:
                s[2] += 1
        for s in [s for s in active if s[2] >= max_new_tokens]:
            active.remove(s)
            latencies.append(now)
    return now, sum(latencies) / len(latencies)


@dataclass
class Plan:
    best: Prediction
    table: list[Prediction]
    hardware: Hardware
    shape: ModelShape
    reason: str

    def to_json(self) -> dict:
        s = asdict(self.shape)
        s.pop("probs")
        return {"batches": self.best.batches, "batch_size": self.best.batch_size, "slots": self.best.slots, "hot_experts": self.best.hot,
                "streaming_slots": self.best.slots - self.best.hot,
                "predicted_tokens_per_s": self.best.tokens_per_s, "reason": self.reason,
                "time_per_step": {"compute_s": self.best.compute_s, "transfer_s": self.best.transfer_s,
                                  "stall_s": self.best.stall_s, "step_s": self.best.step_s},
                "best": self.best.to_json(), "candidates": [p.to_json() for p in self.table],
                "hardware": self.hardware.to_json(), "model": s}


def _rate(p: Prediction) -> float:
    return p.run_tokens_per_s if p.run_tokens_per_s is not None else p.tokens_per_s


def choose(shape: ModelShape, hw: Hardware, vram: int | None, *, context: int = 2048,
           candidates: tuple[int, ...] = BATCH_CANDIDATES, within: float = 0.95,
           prompts: list[int] | None = None, max_new_tokens: int = 64, batch_size: int = 1) -> Plan:
    """Best (batches, hot) under the budget: the fewest batches within `within` of the best tokens/s
    (more batches only pay while they still raise throughput: they cost latency and KV memory)."""
    table: list[Prediction] = []
    for n in candidates:
        slots = slots_for(shape, vram, n, context, batch_size)
        if slots < shape.top_k:
            continue
        best_n = None
        for hot in sorted({0, slots // 4, slots // 2, max(0, slots - 2)}):
            if slots - hot < min(2, slots):
                continue
            p = predict(shape, hw, batches=n, slots=slots, hot=hot, prompts=prompts, max_new_tokens=max_new_tokens,
                        batch_size=batch_size)
            p.memory = {"dense": shape.dense_bytes, "kv": n * batch_size * context * shape.kv_bytes_per_token,
                        "workspace": shape.workspace_bytes + shape.transit_bytes,
                        "experts": slots * shape.expert_bytes}
            if best_n is None or _rate(p) > _rate(best_n) * 1.001:
                best_n = p
        if best_n is not None:
            table.append(best_n)
    if not table:
        from moepack.errors import BudgetError

        raise BudgetError(f"the budget leaves fewer than {shape.top_k} expert slots even with one batch")
    top = max(_rate(p) for p in table)
    best = next(p for p in table if _rate(p) >= within * top)
    bound = "transfer" if best.transfer_s > best.compute_s else "compute"
    reason = (f"{best.batches} batches reach {_rate(best) / top:.0%} of the best predicted tokens/s "
              f"({top:.3g}); {bound}-bound at that point")
    return Plan(best, table, hw, shape, reason)
