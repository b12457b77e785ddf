"""Throughput mode: Klotski's expert-aware multi-batch pipeline on top of the budgeted expert cache.

Many prompts are generated at once. `batches` batches of `batch_size` sequences each are in flight (every
sequence has its own KV cache, so prompts of any length mix); a queue refills a place as soon as its sequence
ends. One *step* advances every sequence in flight by its next tokens (a prompt chunk while it prefills, at
most `prefill_per_step` of those per step, by default one batch's worth, else its last token). Per layer of a
step:

  1. attention runs per sequence (its own KV cache and positions); norms, projections and routing run over
     the stacked tokens;
  2. the MoE of all batches is computed *together*: the union of the experts any batch routes to is
     loaded once (each missing expert one load into one cache slot) and each expert runs once over the
     stacked tokens of every batch that needs it (`PipelineExecutor.run_layer`);
  3. expert transfer overlaps compute: resident and prefetched experts compute first while the misses
     stream in (a loader thread on the CPU, the streamer's side stream on CUDA), and every slot a computed
     expert frees is handed to the next miss, then to the *next* layer's predicted experts
     (`CorrelationPrefetcher`: the next layer's router on this layer's hidden states, widened by the
     experts that co-occur with them across batches in a routing trace), so layer l's compute overlaps the
     transfer of layer l+1's experts;
  4. hot experts (chosen by the planner) can be pinned resident for the whole run.

Greedy outputs are those of `MoePackModel.generate` on each prompt alone: the dense parts run per
sequence with the same shapes, and only the expert products see more tokens at once (the fused kernels
then sum in another order, differences at the float32 rounding level).

    results = generate_many(model, prompts, batches=8, max_new_tokens=64)
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from moepack.errors import MoepackError
from moepack.runtime.api import PREFILL_CHUNK, MoePackModel, expert_cache
from moepack.runtime.executor import StreamingExecutor, expert_ffn
from moepack.runtime.layers import apply_rope, attend, attention_mask, rms_norm
from moepack.runtime.model import KVCache, MoeModel
from moepack.runtime.routing_trace import RoutingTrace
from moepack.runtime.sampling import sample
from moepack.runtime.streamer import Streamer

Key = tuple[int, int]


# --- loads ------------------------------------------------------------------------------------------------
class AsyncLoader:
    """Issues expert loads into cache slots without blocking compute. CPU: one worker thread runs the
    streamer's copies (torch's copy releases the GIL). CUDA: the streamer already copies on a side stream."""

    def __init__(self, streamer: Streamer):
        self.streamer = streamer
        self.cuda = streamer.cuda
        self.pool = None if self.cuda else ThreadPoolExecutor(1, thread_name_prefix="moepack-load")
        self.pending: dict[Key, Future | torch.cuda.Event | None] = {}
        self.busy_s = 0.0  # time the loader spent copying (CPU)
        self._lock = threading.Lock()

    def _copy(self, key: Key, dst: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.streamer.load(key, dst)
        with self._lock:
            self.busy_s += time.perf_counter() - t0

    def submit(self, key: Key, dst: torch.Tensor) -> None:
        if self.cuda:
            self.pending[key] = self.streamer.load(key, dst)
        else:
            self.pending[key] = self.pool.submit(self._copy, key, dst)

    def in_flight(self, key: Key) -> bool:
        return key in self.pending

    def wait(self, key: Key) -> float:
        """Block until `key` has arrived; returns the seconds compute stalled."""
        handle = self.pending.pop(key, None)
        if handle is None:
            return 0.0
        t0 = time.perf_counter()
        if self.cuda:
            if not handle.query():
                handle.synchronize()
            torch.cuda.current_stream().wait_event(handle)
        else:
            handle.result()
        return time.perf_counter() - t0

    def drain(self) -> None:
        for key in list(self.pending):
            self.wait(key)

    def close(self) -> None:
        self.drain()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


# --- prediction of the next layer's experts ---------------------------------------------------------------
class CorrelationPrefetcher:
    """Predicts the experts the next sparse layer will need for the tokens of this layer step.

    Score of expert b at layer l' (the next sparse layer): the tokens whose top-k under l''s router, applied
    to this layer's MoE input, contains b (Fate-style) plus, with a trace, the expected tokens routed to b
    from the experts they use now (P(b at l' | a at l)). Then the experts that co-occur across batches with
    the predicted ones (P(c needed | b needed) >= `co_threshold` in the trace) join them: they are fetched
    together, right behind the expert that pulls them in."""

    def __init__(self, model: MoeModel, trace: RoutingTrace | None = None, *, use_router: bool = True,
                 co_threshold: float = 0.6, min_score: float = 0.5, min_steps: int = 32):
        self.model, self.trace, self.use_router = model, trace, use_router
        self.co_threshold, self.min_score, self.min_steps = co_threshold, min_score, min_steps
        spec = model.spec
        sparse = list(spec.sparse_layer_ids)
        self.next = dict(zip(sparse, sparse[1:], strict=False))
        self._trans = {}
        self._co = {}
        if trace is not None:
            self._trans = {layer: torch.from_numpy(trace.transition(layer)).float() for layer in trace.layers}
            self._co = {layer: trace.cooccurrence(layer) for layer in trace.layers}
            self._steps = {layer: np.diag(trace.co[layer]) for layer in trace.layers}

    def predict(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int | None, list[int]]:
        """(next sparse layer, its experts in fetch order) for this layer step's inputs x [N,H], ids [N,k]."""
        nxt = self.next.get(layer)
        if nxt is None:
            return None, []
        e = self.model.spec.num_experts
        score = torch.zeros(e)
        if self.use_router:
            logits = self.model.router_logits(nxt, x).float()
            ids = logits.topk(self.model.spec.top_k, dim=-1).indices
            score += torch.bincount(ids.flatten().cpu(), minlength=e).float()
        if layer in self._trans:
            used = torch.bincount(topk_ids.flatten().cpu(), minlength=e).float()
            score += used @ self._trans[layer]
        order = [int(i) for i in score.argsort(descending=True) if score[i] >= self.min_score]
        if nxt in self._co:
            co = self._co[nxt]
            grouped: list[int] = []
            for b in order:
                if b not in grouped:
                    grouped.append(b)
                if self._steps[nxt][b] < self.min_steps:
                    continue
                for c in np.argsort(-co[b]):
                    c = int(c)
                    if c != b and co[b, c] >= self.co_threshold and c not in grouped:
                        grouped.append(c)
            order = grouped
        return nxt, order


# --- the multi-batch expert step --------------------------------------------------------------------------
@dataclass
class PipelineStats:
    loads: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    stall_s: float = 0.0
    expert_calls: int = 0
    expert_tokens: int = 0
    layer_steps: int = 0

    @property
    def prefetch_precision(self) -> float:
        resolved = self.prefetch_used + self.prefetch_wasted
        return self.prefetch_used / resolved if resolved else 1.0


class PipelineExecutor:
    """Runs one layer's experts for the stacked tokens of every batch: each needed expert is loaded at most
    once per layer step and computed once over all tokens routed to it. Builds on the runtime's cache and
    streamer (public behaviour only); `hot` experts stay pinned resident while the executor is open."""

    def __init__(self, base: StreamingExecutor, *, prefetcher: CorrelationPrefetcher | None = None,
                 hot: list[Key] | tuple[Key, ...] = (), recorder: RoutingTrace | None = None):
        if base.cache is None or base.streamer is None:
            raise MoepackError("throughput mode needs a budgeted expert cache (load the model with --vram)")
        self.base, self.cache, self.backend = base, base.cache, base.backend
        self.records = base.records
        self.loader = AsyncLoader(base.streamer)
        self.prefetcher, self.recorder = prefetcher, recorder
        self.hot = list(dict.fromkeys(hot))
        self.stats = PipelineStats()
        self.judge_after, self.min_precision = 64, 0.5
        self.step = 0
        self.load_log: list[tuple[int, Key]] = []  # (step, expert) of every load issued
        self.prefetched: dict[int, set[Key]] = {}  # layer -> prefetched keys pinned for it
        streaming = self.cache.slots - len(self.hot)
        if streaming < 1:
            raise MoepackError(f"{len(self.hot)} hot experts leave no streaming slot of {self.cache.slots}")
        self._pin_hot()

    # -- slots -------------------------------------------------------------------------------------
    def _pin_hot(self) -> None:
        for key in self.hot:
            if key not in self.cache:
                self._issue(key)
            self.cache.pinned.add(key)
        for key in self.hot:
            self.stats.stall_s += self.loader.wait(key)

    def _slot_free(self) -> bool:
        c = self.cache
        return bool(c.free) or any(k not in c.pinned for k in c.where)

    def _issue(self, key: Key) -> None:
        dst = self.cache.allocate(key, self.records[key].nbytes)
        self.cache.pinned.add(key)
        self.loader.submit(key, dst)
        self.load_log.append((self.step, key))
        self.stats.loads += 1

    def _release(self, key: Key) -> None:
        if key not in self.hot:
            self.cache.pinned.discard(key)

    def _prefetch(self, plan: deque) -> None:
        """Hand free slots to the next layer's predicted experts (never evicting a pinned one). Stops for
        good once enough prefetches resolved and fewer than `min_precision` of them were used: a wasted
        load costs link time the misses need."""
        st = self.stats
        if st.prefetch_used + st.prefetch_wasted >= self.judge_after and st.prefetch_precision < self.min_precision:
            plan.clear()
            return
        if not plan:
            return
        target = plan[0][0]
        cache = self.cache
        guard = {k for k in cache.where if k[0] == target and k not in cache.pinned}
        cache.pinned |= guard  # a prefetch never evicts an expert of the layer it prefetches for
        try:
            while plan and self._slot_free():
                layer, e = plan.popleft()
                key = (layer, e)
                if key in cache:
                    continue
                self._issue(key)
                self.prefetched.setdefault(layer, set()).add(key)
                self.stats.prefetch_issued += 1
        finally:
            cache.pinned -= guard

    # -- one layer step -----------------------------------------------------------------------------
    def run_layer(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
        """x [N, H] (all batches stacked), topk_ids/topk_weights [N, k] -> routed experts' sum [N, H]."""
        cache, stats = self.cache, self.stats
        stats.layer_steps += 1
        if self.recorder is not None:
            self.recorder.record(layer, topk_ids)
        ids_cpu = topk_ids.cpu()
        counts = Counter(ids_cpu.flatten().tolist())
        needed = {(layer, e) for e in counts}
        for key in self.prefetched.pop(layer, set()):  # prefetched for this layer
            if key in needed:
                stats.prefetch_used += 1
            else:
                stats.prefetch_wasted += 1
                self._release(key)
        ready, misses = [], []
        for e in sorted(counts, key=lambda e: -counts[e]):  # most tokens first
            key = (layer, e)
            if cache.lookup(key) is not None:  # resident or in flight: pin it now
                cache.pinned.add(key)
                ready.append(e)
            else:
                misses.append(e)
        ready.sort(key=lambda e: self.loader.in_flight((layer, e)))  # arrived ones before in-flight ones
        queue = deque(misses)
        order: list[int] = list(ready)
        while queue and self._slot_free():
            e = queue.popleft()
            self._issue((layer, e))
            order.append(e)
        plan: deque | None = None
        out = torch.zeros_like(x)
        i = 0
        while i < len(order):
            e = order[i]
            key = (layer, e)
            stats.stall_s += self.loader.wait(key)
            blob = cache.buffer[cache.where[key], : self.records[key].nbytes]
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            y = expert_ffn(x[tok], self.base._projections(key, blob), self.backend)
            out.index_add_(0, tok, (y * topk_weights[tok, slot, None]).to(out.dtype))
            stats.expert_calls += 1
            stats.expert_tokens += int(tok.numel())
            self._release(key)
            i += 1
            if i == len(order) and queue and not self._slot_free():
                raise RuntimeError(f"layer {layer}: no cache slot can be freed for the next expert")
            while queue and self._slot_free():  # the freed slot goes to the next miss ...
                e2 = queue.popleft()
                self._issue((layer, e2))
                order.append(e2)
            if not queue and self.prefetcher is not None:  # ... then to the next layer's experts
                if plan is None:
                    nxt, experts = self.prefetcher.predict(layer, x, topk_ids)
                    plan = deque((nxt, b) for b in experts) if nxt is not None else deque()
                self._prefetch(plan)
        return out

    def close(self) -> None:
        self.loader.drain()
        for keys in self.prefetched.values():
            for key in keys:
                self._release(key)
        self.prefetched.clear()
        for key in self.hot:
            self.cache.pinned.discard(key)
        self.loader.close()

    def duplicate_loads(self) -> int:
        """Loads of an expert already loaded in the same step (0: each loaded at most once per layer step)."""
        return sum(n - 1 for n in Counter(self.load_log).values() if n > 1)


# --- sequences and the engine ---------------------------------------------------------------------------
@dataclass
class SequenceResult:
    index: int
    prompt_tokens: int
    tokens: list[int]
    text: str
    latency_s: float  # from the start of the run to this prompt's last token
    ttft_s: float  # from the start of the run to its first token
    queued_s: float  # from the start of the run until it entered a batch


@dataclass
class ThroughputStats:
    prompts: int = 0
    batches: int = 0
    batch_size: int = 1
    generated_tokens: int = 0
    prompt_tokens: int = 0
    wall_s: float = 0.0
    steps: int = 0  # forward steps (every batch in flight advanced once)
    layer_steps: int = 0
    stall_s: float = 0.0
    load_s: float = 0.0  # loader busy time (CPU copies)
    loads: int = 0
    bytes_moved: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    expert_calls: int = 0
    expert_tokens: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    duplicate_loads: int = 0
    expert_slots: int = 0
    hot_experts: int = 0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def stall_fraction(self) -> float:
        return self.stall_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_latency_s(self) -> float:
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else 0.0

    @property
    def loads_per_layer_step(self) -> float:
        return self.loads / max(1, self.layer_steps)

    def to_json(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out.update(tokens_per_s=self.tokens_per_s, stall_fraction=self.stall_fraction,
                   mean_latency_s=self.mean_latency_s)
        return out


@dataclass
class ThroughputResult:
    results: list[SequenceResult]
    stats: ThroughputStats


@dataclass
class _Seq:
    index: int
    ids: list[int]
    cache: KVCache
    max_new: int
    fed: int = 0  # prompt tokens already in the cache
    out: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    t_in: float = 0.0
    t_first: float = 0.0
    latency: float = 0.0
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.ids)


class ThroughputEngine:
    """Generates many prompts with `batches` x `batch_size` sequences in flight over one MoePackModel's cache
    and streamer."""

    def __init__(self, model: MoePackModel, *, batches: int = 4, batch_size: int = 1,
                 hot: list[Key] | tuple[Key, ...] = (), trace: RoutingTrace | None = None, prefetch: bool = True,
                 prefill_per_step: int | None = None, record: RoutingTrace | None = None, stack_dense: bool = True):
        if batches < 1:
            raise MoepackError("--batches must be at least 1")
        if batch_size < 1:
            raise MoepackError("--batch-size must be at least 1")
        self.pm, self.model, self.spec = model, model.model, model.spec
        self.batches, self.batch_size = batches, batch_size
        self.in_flight = batches * batch_size
        self.prefill_per_step = max(1, prefill_per_step if prefill_per_step is not None else batch_size)
        self.stack_dense = stack_dense
        prefetcher = CorrelationPrefetcher(self.model, trace) if prefetch else None
        self.executor = PipelineExecutor(model.executor, prefetcher=prefetcher, hot=hot, recorder=record)

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> ThroughputEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one step over every batch in flight -----------------------------------------------------------
    def _step(self, seqs: list[_Seq], feeds: list[list[int]]) -> list[torch.Tensor]:
        return (self._step_stacked if self.stack_dense else self._step_per_sequence)(seqs, feeds)

    def _step_stacked(self, seqs: list[_Seq], feeds: list[list[int]]) -> list[torch.Tensor]:
        """All batches' tokens as one [N, H] stream: norms, projections, router, shared expert and lm_head run
        once over the stack; only rotary positions, KV caches and the attention core are per sequence."""
        m, spec, w = self.model, self.spec, self.model.w
        lens = [len(f) for f in feeds]
        starts = [s.cache.length for s in seqs]
        positions = torch.cat([torch.arange(a, a + t) for a, t in zip(starts, lens, strict=True)]).to(m.device)
        cos, sin = m._rope(positions)  # [N, r]: per token, so one rotation serves every sequence
        h = m.embed_tokens(torch.tensor([t for f in feeds for t in f], dtype=torch.long))  # [N, H]
        bounds = list(zip(np.cumsum([0, *lens[:-1]]).tolist(), np.cumsum(lens).tolist(), strict=True))
        nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        for layer in range(spec.num_layers):
            n = m.layers[layer]
            for hook in m.layer_hooks:
                hook(layer, h)
            x = rms_norm(h, w[n["input_norm"]], spec.rms_norm_eps)
            q, k, v = m.linear(x, w[n["q"]]), m.linear(x, w[n["k"]]), m.linear(x, w[n["v"]])
            if spec.qkv_bias:
                q, k, v = q + w[n["q_bias"]], k + w[n["k_bias"]], v + w[n["v_bias"]]
            if spec.qk_norm == "full":
                q = rms_norm(q, w[n["q_norm"]], spec.rms_norm_eps)
                k = rms_norm(k, w[n["k_norm"]], spec.rms_norm_eps)
            if spec.clip_qkv is not None:
                c = spec.clip_qkv
                q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
            q, k, v = q.view(-1, nh, d), k.view(-1, nkv, d), v.view(-1, nkv, d)
            if spec.qk_norm == "head":
                q = rms_norm(q, w[n["q_norm"]], spec.rms_norm_eps)
                k = rms_norm(k, w[n["k_norm"]], spec.rms_norm_eps)
            q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, heads, N, d]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            outs = []
            for s, start, (a, b) in zip(seqs, starts, bounds, strict=True):
                ks, vs = s.cache.update(layer, k[:, :, a:b], v[:, :, a:b])
                mask = attention_mask(start, b - a, ks.shape[2], spec.sliding_window_for(layer), m.device)
                outs.append(attend(q[:, :, a:b], ks, vs, mask, m.scale)[0])  # [t, nh*d]
            o = m.linear(torch.cat(outs), w[n["o"]])
            if spec.o_bias:
                o = o + w[n["o_bias"]]
            h = h + o
            x = rms_norm(h, w[n["post_attn_norm"]], spec.rms_norm_eps)
            h = h + m._mlp(layer, x, self.executor.run_layer)
        for s, t in zip(seqs, lens, strict=True):
            s.cache.advance(t)
        last = torch.tensor([b - 1 for _, b in bounds], device=m.device)
        logits = m.linear(rms_norm(h[last], m.final_norm, spec.rms_norm_eps), m.lm_head)  # [B, V]
        self.executor.step += 1
        return list(logits)

    def _step_per_sequence(self, seqs: list[_Seq], feeds: list[list[int]]) -> list[torch.Tensor]:
        """Feed each sequence its tokens; returns each one's logits at its last position [V]. The dense parts
        run per sequence with a single run's shapes (bitwise the same numbers); only the MoE is stacked."""
        m, spec = self.model, self.spec
        hs, ropes, starts = [], [], []
        for s, f in zip(seqs, feeds, strict=True):
            start = s.cache.length
            positions = torch.arange(start, start + len(f), device=m.device)
            ropes.append(m._rope(positions))
            starts.append(start)
            hs.append(m.embed_tokens(torch.tensor(f, dtype=torch.long))[None])  # [1, t, H]
        for layer in range(spec.num_layers):
            n = m.layers[layer]
            xs = []
            for i, s in enumerate(seqs):
                h = hs[i]
                for hook in m.layer_hooks:
                    hook(layer, h.view(h.shape[1], -1))
                x = rms_norm(h, m.w[n["input_norm"]], spec.rms_norm_eps)
                h = h + m._attention(layer, x, *ropes[i], s.cache, starts[i])
                hs[i] = h
                xs.append(rms_norm(h, m.w[n["post_attn_norm"]], spec.rms_norm_eps).view(h.shape[1], -1))
            if not spec.is_sparse(layer):
                for i in range(len(seqs)):
                    hs[i] = hs[i] + m._mlp(layer, xs[i]).view(1, xs[i].shape[0], -1)
                continue
            routes = []
            for x in xs:  # routing per sequence: the same shapes, so the same choices, as a single run
                logits, ids, weights = m.route(layer, x)
                for hook in m.route_hooks:
                    hook(layer, x, logits, ids, weights)
                routes.append((ids, weights))
            out = self.executor.run_layer(layer, torch.cat(xs), torch.cat([r[0] for r in routes]),
                                          torch.cat([r[1] for r in routes]))
            row = 0
            for i, x in enumerate(xs):
                o = out[row: row + x.shape[0]]
                row += x.shape[0]
                if "shared_gate" in n:
                    o = o + m.shared_expert(layer, x)
                hs[i] = hs[i] + o.view(1, x.shape[0], -1)
        logits = []
        for s, f, h in zip(seqs, feeds, hs, strict=True):
            s.cache.advance(len(f))
            h = rms_norm(h, m.final_norm, spec.rms_norm_eps)[:, -1:]
            logits.append(m.linear(h, m.lm_head)[0, -1])
        self.executor.step += 1
        return logits

    # -- the run -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[str | list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True) -> ThroughputResult:
        pm = self.pm
        ids_list = [pm.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for i, ids in enumerate(ids_list):
            if not ids:
                raise MoepackError(f"prompt {i + 1} is empty")
            if len(ids) + max_new_tokens > pm.context:
                raise MoepackError(f"prompt {i + 1} ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed "
                                   f"the context of {pm.context} tokens; raise --context")
        cache, ex = self.executor.cache, self.executor
        base = (cache.stats.hits, cache.stats.misses, cache.stats.bytes_loaded, ex.stats.loads, ex.stats.stall_s,
                ex.loader.busy_s, ex.stats.expert_calls, ex.stats.expert_tokens, ex.stats.prefetch_issued,
                ex.stats.prefetch_used, ex.stats.layer_steps, ex.step, ex.stats.prefetch_wasted)
        queue = deque(range(len(ids_list)))
        active: list[_Seq] = []
        done: dict[int, _Seq] = {}
        t0 = time.perf_counter()
        while queue or active:
            while queue and len(active) < self.in_flight:
                i = queue.popleft()
                gen = torch.Generator().manual_seed(seed + i) if seed is not None else None
                active.append(_Seq(i, ids_list[i], self.model.new_cache(capacity=len(ids_list[i]) + max_new_tokens),
                                   max_new_tokens, generator=gen, t_in=time.perf_counter() - t0))
            seqs, feeds, prefills = [], [], 0
            for s in active:
                if s.prefilling:
                    if prefills >= self.prefill_per_step:
                        continue
                    prefills += 1
                    feeds.append(s.ids[s.fed: s.fed + PREFILL_CHUNK])
                    s.fed += len(feeds[-1])
                else:
                    feeds.append([s.out[-1]])
                seqs.append(s)
            for s, logits in zip(seqs, self._step(seqs, feeds), strict=True):
                if s.prefilling:
                    continue
                token = sample(logits, temperature=temperature, top_p=top_p, generator=s.generator)
                if not s.out:
                    s.t_first = time.perf_counter() - t0
                s.out.append(token)
                if (stop_at_eos and token in self.spec.eos_token_ids) or len(s.out) >= s.max_new:
                    s.done = True
            for s in [s for s in active if s.done]:
                active.remove(s)
                s.logits = None
                s.cache = None
                done[s.index] = s
                s.latency = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        results = [SequenceResult(i, len(s.ids), s.out, pm.decode(s.out), s.latency, s.t_first, s.t_in)
                   for i, s in sorted(done.items())]
        st = ThroughputStats(
            prompts=len(results), batches=self.batches, batch_size=self.batch_size, generated_tokens=sum(len(r.tokens) for r in results),
            prompt_tokens=sum(r.prompt_tokens for r in results), wall_s=wall,
            steps=ex.step - base[11], layer_steps=ex.stats.layer_steps - base[10], stall_s=ex.stats.stall_s - base[4],
            load_s=ex.loader.busy_s - base[5], loads=ex.stats.loads - base[3],
            bytes_moved=cache.stats.bytes_loaded - base[2], cache_hits=cache.stats.hits - base[0],
            cache_misses=cache.stats.misses - base[1], expert_calls=ex.stats.expert_calls - base[6],
            expert_tokens=ex.stats.expert_tokens - base[7], prefetch_issued=ex.stats.prefetch_issued - base[8],
            prefetch_used=ex.stats.prefetch_used - base[9], prefetch_wasted=ex.stats.prefetch_wasted - base[12],
            duplicate_loads=ex.duplicate_loads(),
            expert_slots=cache.slots, hot_experts=len(ex.hot), latencies_s=[r.latency_s for r in results])
        return ThroughputResult(results, st)


def load_for_throughput(path, *, vram: str | int | None, batches: int, batch_size: int = 1, context: int = 2048,
                        slots: int | None = None, **options) -> MoePackModel:
    """A MoePackModel whose budget holds `batches` x `batch_size` KV caches of `context` tokens (so the expert
    slots are what is left after them), or exactly `slots` expert slots when given (benchmarks)."""
    pm = MoePackModel.load(path, vram=vram if slots is None else None, context=context * batches * batch_size,
                           **options)
    pm.context = context
    if slots is None and pm.executor.cache is None:  # no budget: every expert gets a slot
        slots = len(pm.pack.manifest.experts)
    if slots is not None:
        pack = pm.pack
        slots = max(1, min(slots, len(pack.manifest.experts)))
        cache = expert_cache(pack, slots, pm.model.device, options.get("cache_policy", "lru"),
                             cache_prior=options.get("cache_prior", False))
        streamer = Streamer(pack, pm.model.device, cache.slot_bytes, verify=options.get("verify", True))
        pm.executor = StreamingExecutor(pack, cache, streamer, backend=pm.executor.backend)
        pm.model.executor = pm.executor
    return pm


def generate_many(model: MoePackModel, prompts: list[str | list[int]], *, batches: int = 4, batch_size: int = 1,
                  max_new_tokens: int = 64, hot: list[Key] | tuple[Key, ...] = (), trace: RoutingTrace | None = None,
                  prefetch: bool = True, stack_dense: bool = True, **sampling) -> ThroughputResult:
    """Generate for every prompt with `batches` batches of `batch_size` sequences in flight (module docstring)."""
    with ThroughputEngine(model, batches=batches, batch_size=batch_size, hot=hot, trace=trace, prefetch=prefetch,
                          stack_dense=stack_dense) as engine:
        return engine.generate(prompts, max_new_tokens=max_new_tokens, **sampling)
