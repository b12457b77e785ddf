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

import contextlib
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

PREFILL_CHUNK = 256
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

    @property
    def total_experts(self) -> int:
        return self.sparse_layers * self.num_experts

    def layer_probs(self) -> list[np.ndarray]:
        if self.probs:
            return [np.clip(np.asarray(p, np.float64), 0.0, 1.0) for p in self.probs]
        return [np.full(self.num_experts, self.top_k / self.num_experts)] * self.sparse_layers

    @classmethod
    def from_pack(cls, pack, *, trace=None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> ModelShape:
        from moepack.format.constants import DTYPES
        from moepack.runtime.api import workspace_bytes
        from moepack.runtime.model import KVCache, storage_dtype, widens_on
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
        widen = widens_on(torch.device(device), dtype)
        dense = sum(math.prod(t.shape) * storage_dtype(DTYPES[t.dtype], len(t.shape), dtype, widen).itemsize
                    for t in pack.manifest.tensors)  # as MoeModel holds them
        return cls(name=pack.path.name, num_layers=spec.num_layers, sparse_layers=len(spec.sparse_layer_ids),
                   num_experts=spec.num_experts, top_k=spec.top_k, hidden=spec.hidden_size,
                   intermediate=spec.moe_intermediate_size,
                   expert_bytes=max(e.nbytes for e in pack.manifest.experts), dense_bytes=dense,
                   kv_bytes_per_token=KVCache.bytes_per_token(spec, dtype), workspace_bytes=workspace_bytes(spec, dtype),
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
    """Expert slots left by a budget once dense weights, batches x batch_size KV caches and the workspace are in."""
    if vram is None:
        return shape.total_experts
    fixed = shape.dense_bytes + batches * batch_size * context * shape.kv_bytes_per_token + shape.workspace_bytes
    return int(max(0, min(shape.total_experts, (vram - fixed) // shape.expert_bytes)))


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
                        "workspace": shape.workspace_bytes, "experts": slots * shape.expert_bytes}
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


# --- measuring this machine ---------------------------------------------------------------------------------
def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_link(pack, device: torch.device, *, experts: int = 32, repeats: int = 3) -> float:
    """GB/s of expert blobs moved from the mapped pack into a slot by the runtime's streamer (CPU: one copy
    from the mapped pages, which are then dropped; CUDA: pinned staging + host-to-device copy), cycling
    through up to `experts` experts so that the pages are as cold as in a real run."""
    from moepack.runtime.streamer import Streamer

    keys = list(pack.expert_records)[:: max(1, len(pack.expert_records) // experts)][:experts]
    nbytes = max(pack.expert_records[k].nbytes for k in keys)
    streamer = Streamer(pack, device, nbytes, verify=False)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def once() -> None:
        for k in keys:
            streamer.load(k, dst[: pack.expert_records[k].nbytes])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    moved = sum(pack.expert_records[k].nbytes for k in keys)
    return moved / _median(once, repeats) / 1e9


def measure_hardware(pm, *, link_gbps: float | None = None, device_tflops: float | None = None,
                     mem_gbps: float | None = None, repeats: int = 9, measure_overlap: bool = True) -> Hardware:
    """Measure (or take) the hardware numbers for a loaded MoePackModel `pm`. `measure_overlap=False` skips the
    copy/compute overlap microbenchmark (taken as 1) when `calibrate_engine` will fit the overlap instead."""
    model, pack, spec = pm.model, pm.pack, pm.spec
    dev = model.device
    key = next(iter(pack.expert_records))
    blob = pack.expert_blob(*key).to(dev)
    projs = pm.executor._projections(key, blob)
    backend = pm.executor.backend
    sources = []
    if link_gbps is None:
        link_gbps = measure_link(pack, dev)
        sources.append("link measured")
    h, i = spec.hidden_size, spec.moe_intermediate_size
    expert_curve: tuple = ()
    dense_curve: tuple = ()
    if device_tflops is not None:
        flops = device_tflops * 1e12
        token = 6 * h * i / flops
        fixed = pack.expert_records[key].nbytes / (mem_gbps * 1e9) if mem_gbps else 0.0
        dense_params = sum(math.prod(t.shape) for t in pack.manifest.tensors) / max(1, spec.num_layers)
        dense_token, head_token = 2 * dense_params / flops, 2 * h * spec.vocab_size / flops
        dense_fixed = 0.0
        sources.append("compute from --device-tflops")
    else:
        expert_curve = _measure_expert_curve(pm, repeats)
        head_token = _measure_head(pm, repeats)
        dense_curve = _measure_dense_curve(pm, repeats, head_token)
        fixed, token = _linear_fit(expert_curve)  # the 1- and 8-token points, for displays and on-paper use
        dense_fixed, dense_token = _linear_fit(dense_curve)
        sources.append("compute measured")
    overlap = _measure_overlap(pm, projs, backend) if measure_overlap and dev.type != "cuda" else 1.0
    return Hardware(link_gbps=link_gbps, expert_fixed_s=fixed, expert_token_s=token, dense_token_s=dense_token,
                    head_token_s=head_token, overlap=overlap, dense_fixed_s=dense_fixed, source=", ".join(sources),
                    expert_curve=expert_curve, dense_curve=dense_curve)


ENGINE_SEQS = (1, 4, 16, 32)
STREAMING_SEQS = (1, 8, 32)


def _bisect(predicted, measured: float, lo: float, hi: float, *, falling: bool) -> float:
    """x in [lo, hi] where the monotonic `predicted(x)` meets `measured` (clamped to the ends)."""
    for _ in range(24):
        mid = (lo + hi) / 2
        above = predicted(mid) > measured
        lo, hi = (mid, hi) if above == falling else (lo, mid)
    return (lo + hi) / 2


def calibrate_engine(pm, shape: ModelShape, hw: Hardware, *, seqs: tuple[int, ...] = ENGINE_SEQS,
                     new_tokens: int = 6, prompt_tokens: int = 4,
                     streaming_seqs: tuple[int, ...] = STREAMING_SEQS, repeats: int = 5) -> Hardware:
    """Hardware fitted to short runs (each timed `repeats` times, the median kept: one run on a shared
    machine can be off by tens of percent) of the runtime itself (docs/planning.md, "Calibration"):

    * `engine_scale`: with every expert resident in `pm`'s cache (only compute counts), measured / modelled
      run time of the multi-batch engine for each number of sequences in `seqs`;
    * `overlap_curve`: with a small cache (an eighth of the experts), for each number of sequences in
      `streaming_seqs`, the overlap whose predicted run time matches the measured one (a copy thread beside
      compute contends for memory and cores in ways the microbenchmark behind `measure_hardware`'s overlap
      does not see, and how much of a copy hides depends on how much compute a step has);
    * `plain_scale`: measured / modelled run time of the plain runtime (one sequence, synchronous loads) on
      the same small cache.
    The small cache is not a budget the planner is asked about in the benchmarks; every configuration it
    predicts there is out of sample."""
    from dataclasses import replace

    from moepack.runtime.throughput import generate_many, load_for_throughput

    cache = pm.executor.cache
    if cache is None or cache.slots < shape.total_experts:
        return replace(hw, source=hw.source + ", engine uncalibrated (needs every expert resident)")
    g = torch.Generator().manual_seed(0)

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(0, pm.spec.vocab_size, (prompt_tokens,), generator=g).tolist() for _ in range(n)]

    def timed(model, batch: list[list[int]]) -> float:
        generate_many(model, batch[:1], batches=1, max_new_tokens=2, prefetch=False, stop_at_eos=False)  # warm
        return _median(lambda: generate_many(model, batch, batches=len(batch), max_new_tokens=new_tokens,
                                             prefetch=False, stop_at_eos=False), repeats)

    def timed_plain(model, batch: list[list[int]]) -> float:
        model.generate(batch[0], max_new_tokens=2, stop_at_eos=False)  # warm
        return _median(lambda: [model.generate(p, max_new_tokens=new_tokens, stop_at_eos=False) for p in batch],
                       repeats)

    def modelled(h: Hardware, n: int, slots: int) -> float:
        return predict(shape, h, batches=n, slots=slots, prompts=[prompt_tokens] * n,
                       max_new_tokens=new_tokens).run_s

    def modelled_plain(h: Hardware, n: int, slots: int) -> float:  # n prompts one after another
        return predict(shape, h, batches=1, slots=slots, prompts=[prompt_tokens] * n, max_new_tokens=new_tokens,
                       pipelined=False, engine=False).run_s

    scale = tuple((n, float(timed(pm, prompts(n)) / modelled(hw, n, shape.total_experts))) for n in seqs)
    hw = replace(hw, engine_scale=scale)
    slots = max(2 * shape.top_k, shape.total_experts // 8)
    small = load_for_throughput(pm.pack.path, vram=None, batches=1, slots=slots, context=pm.context,
                                device=str(pm.model.device), dtype=pm.model.dtype)
    curve = []
    for n in streaming_seqs:  # the predicted time falls as overlap rises
        measured = timed(small, prompts(n))
        curve.append((n, _bisect(lambda o, n=n: modelled(replace(hw, overlap=o), n, slots), measured, 0.0, 1.0,
                                 falling=True)))
    batch = prompts(4)
    measured = timed_plain(small, batch)
    plain = _bisect(lambda f: modelled_plain(replace(hw, plain_scale=f), len(batch), slots), measured, 0.1, 10.0,
                    falling=False)
    return replace(hw, overlap=statistics.median(o for _, o in curve), overlap_curve=tuple(curve),
                   plain_scale=float(plain), source=hw.source + ", engine calibrated")


class _ZeroExperts:
    def forward(self, layer, x, topk_ids, topk_weights):
        return torch.zeros_like(x)


@contextlib.contextmanager
def _experts_stubbed(model):
    """The model with its experts replaced by zeros: what is left is the dense parts."""
    saved, model.executor = model.executor, _ZeroExperts()
    try:
        yield model
    finally:
        model.executor = saved


def _measure_head(pm, repeats: int) -> float:
    """Seconds of one token's lm_head product and argmax."""
    model = pm.model
    h = torch.randn(1, model.spec.hidden_size, dtype=model.dtype, device=model.device)
    return _median(lambda: int(model.linear(h, model.lm_head).argmax()), repeats)


def _lower_envelope(curve: list[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """A cost curve made non-decreasing from below: each point is the smallest time measured at or beyond its
    token count. More tokens never cost less, and interference on a shared machine only adds time, so a point
    above a later one is the noisy one (the median of a few repeats still catches a burst)."""
    out, low = [], math.inf
    for n, t in reversed(sorted(curve)):
        low = min(low, t)
        out.append((n, low))
    return tuple(reversed(out))


def _linear_fit(curve: tuple[tuple[int, float], ...]) -> tuple[float, float]:
    """(fixed, per token) through a curve's 1- and 8-token points."""
    at = dict(curve)
    token = max(0.0, (at[8] - at[1]) / 7)
    return max(0.0, at[1] - token), token


CURVE_TOKENS = (1, 2, 4, 8, 16, 32, 64)


def _measure_expert_curve(pm, repeats: int, points: tuple[int, ...] = CURVE_TOKENS) -> tuple:
    """((n, seconds of one expert call with n tokens), ...) through the runtime's executor (routing, kernels,
    gathering and summing included): n tokens routed to k experts of every sparse layer in turn, other
    experts in each layer, so the weights come from memory as in a real decode rather than from a warm cache."""
    spec, dev, ex = pm.spec, pm.model.device, pm.executor
    layers, k, e = list(spec.sparse_layer_ids), spec.top_k, spec.num_experts
    out = []
    for n in points:
        x = torch.randn(n, spec.hidden_size, device=dev, dtype=pm.model.dtype)
        w = torch.full((n, k), 1.0 / k, device=dev, dtype=pm.model.dtype)
        routes = [torch.tensor([(r * k + j) % e for j in range(k)], device=dev).expand(n, k).contiguous()
                  for r in range(max(1, e // k))]

        def sweep(x=x, w=w, routes=routes) -> None:
            for i, layer in enumerate(layers):
                ex.forward(layer, x, routes[i % len(routes)], w)

        sweep()  # warm (and resident, under a budget)
        out.append((n, _median(sweep, repeats) / (len(layers) * k)))
    ex.reset_counters()
    return _lower_envelope(out)


def _measure_dense_curve(pm, repeats: int, head_s: float, points: tuple[int, ...] = CURVE_TOKENS) -> tuple:
    """((n, seconds of one layer's dense parts for n new tokens), ...): a forward with the experts stubbed out,
    the last position's head taken off, divided by the layers."""
    out = []
    with _experts_stubbed(pm.model) as model:
        cache = model.new_cache(capacity=64 + max(points))
        model.forward(torch.arange(2, 34) % model.spec.vocab_size, cache)
        for n in points:
            ids = torch.arange(3, 3 + n) % model.spec.vocab_size

            def step(ids=ids) -> None:
                model.forward(ids, cache, last_only=True)
                cache.crop(32)

            step()
            out.append((n, max(0.0, _median(step, repeats) - head_s) / model.spec.num_layers))
    return _lower_envelope(out)


def _measure_overlap(pm, projs, backend, seconds: float = 0.3) -> float:
    """Share of the shorter of (expert compute, expert copy) that hides under the other when a copy thread
    runs beside compute on this machine (1: perfect overlap, 0: they serialise)."""
    from moepack.runtime.executor import expert_ffn

    pack = pm.pack
    keys = list(pack.expert_records)
    nbytes = max(pack.expert_records[k].nbytes for k in keys)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    x = torch.randn(1, pm.spec.hidden_size)

    def copies(n: int) -> None:
        for j in range(n):
            k = keys[j % len(keys)]
            src = pack.expert_blob(*k)
            dst[: src.numel()].copy_(src)
            pack.release(*k)

    def computes(n: int) -> None:
        for _ in range(n):
            expert_ffn(x, projs, backend)

    t_c1 = _median(lambda: computes(1), 3)
    t_x1 = _median(lambda: copies(1), 3)
    nc = max(1, int(seconds / max(t_c1, 1e-6)))
    nx = max(1, int(seconds / max(t_x1, 1e-6)))
    t_c = _median(lambda: computes(nc), 1)
    t_x = _median(lambda: copies(nx), 1)
    worker = threading.Thread(target=copies, args=(nx,))
    t0 = time.perf_counter()
    worker.start()
    computes(nc)
    worker.join()
    both = time.perf_counter() - t0
    return float(min(1.0, max(0.0, (t_c + t_x - both) / max(min(t_c, t_x), 1e-9))))
