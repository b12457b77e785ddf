"""The streaming expert executor: runs a layer's routed experts from the budgeted cache, for every token of
the engine's step at once (one sequence or many: the union of the experts any token routes to is loaded at
most once per layer step and computed once over all the tokens routed to it).

Per layer the bookkeeping is a few tensor ops over the flattened top-k ids (one bincount, one argsort, one
gather, one host sync, one index_add), never a mask or a nonzero per expert. Then every needed expert that is
resident is pinned, every missing one gets a slot and its load is issued at once (`AsyncLoader`: a copy
thread on the CPU, the streamer's side stream on CUDA), so resident ones compute while misses travel; then
the prefetch queue (experts predicted for the next layer, runtime/prefetch.py) is issued into unpinned
slots; then the experts are computed, resident ones first, each unpinned once done so a later load may reuse
its slot. Outputs are summed in expert-id order whatever the compute order, so the cache state never
changes the numbers. An expert's typed views (`prepared.Projection`) are built once per load into a slot
(and once per expert when used in place from the mapped pack), not per call.

Before a layer runs, the cache's policy is told which experts its tokens route to (`ExpertCache.visit`), so
policies that estimate reuse (`reuse`) can follow the layer cycle. `pin_hot` keeps chosen experts resident
for as long as they are pinned (throughput planning: the planner's hot experts).

Prefetches are gated: a prediction comes with a probability (the prefetcher's measured hit rate for that
kind of prediction); below `prefetch_min_prob` it is only a hint to the policy, and a prediction is loaded
only when the policy admits it over the expert it would evict (`ExpertCache.admits`), so a prefetch never
displaces an expert the policy values more. Under partial loads the predicted use would be served by a
cheaper partial read anyway, so a prediction is admitted only if the expert is worth keeping after that use
(`beyond`).

Bypass (`bypass`): a miss the policy does not admit over the expert it would evict is not cached; the whole
expert streams through a transit buffer (CUDA) or is used in place from the mapped pages (CPU), so a rarely
used expert moves its bytes once without displacing one the policy values more.

Optional adaptive execution (runtime/adaptive.py): big-little routing (`big_little` threshold; a token whose
little share is at least `fallback` also drops a big expert that is not resident, see `_fallback`) and FloE
channel sparsity (`sparse_keep`), optionally with partial loads: a miss the policy does not admit moves only
up and the kept rows of gate/down, straight from the pack, and is not cached.

Counters go to `stats` (a `stats.EngineStats` the engine owns)."""

from __future__ import annotations

from itertools import accumulate

import torch

from moepack.format import Pack
from moepack.kernels import Backend
from moepack.runtime.adaptive import big_little_mask, little_share, reweight
from moepack.runtime.cache import ExpertCache
from moepack.runtime.expert_compute import ExpertTerms, expert_ffn, partial_ffn, sparse_ffn
from moepack.runtime.fused_decode import experts_one_token, experts_op
from moepack.runtime.loader import AsyncLoader
from moepack.runtime.prepared import Projection, expert_projections
from moepack.runtime.stats import EngineStats
from moepack.runtime.streamer import Streamer

__all__ = ["FALLBACK_SHARE", "PREFETCH_MIN_PROB", "StreamingExecutor", "expert_ffn", "sparse_ffn"]

PREFETCH_MIN_PROB = 0.75  # predictions less likely than this are hints only (see benchmarks/bench_prefetch.py)
FALLBACK_SHARE = 0.7  # big-little: tokens whose little half carries less router weight never fall back

Key = tuple[int, int]


def _at(threshold: float | dict[int, float] | None, layer: int) -> float | None:
    """One threshold, or this layer's (a layer without one: off)."""
    return threshold.get(layer) if isinstance(threshold, dict) else threshold


class StreamingExecutor:
    def __init__(self, pack: Pack, cache: ExpertCache | None, streamer: Streamer | None, *,
                 backend: Backend = Backend.AUTO, big_little: float | dict[int, float] | None = None,
                 fallback: float | dict[int, float] | None = FALLBACK_SHARE,
                 sparse_keep: float | dict[Key, float] | None = None, partial_loads: bool = False,
                 bypass: bool = False, device: torch.device | None = None,
                 prefetch_min_prob: float = PREFETCH_MIN_PROB, terms: ExpertTerms | None = None):
        """With `cache=None` every expert is used in place from the mapped pack (CPU, no budget).
        `big_little` and `fallback` are one threshold or one per layer, `sparse_keep` one keep fraction or
        one per expert (`auto`, runtime/adaptive.py); a keep of 1.0 runs that expert dense. `terms`: the
        family's expert biases and nonlinearity (GPT-OSS, `ExpertTerms.of`), None for plain SwiGLU."""
        self.terms = terms
        self.pack, self.cache, self.streamer, self.backend = pack, cache, streamer, Backend.parse(backend)
        self.records = pack.expert_records
        self.num_experts = pack.spec.num_experts
        self.big_little = big_little
        # a little-share threshold, or None: off (False, as RunConfig may hand it, is off too)
        self.fallback = fallback if big_little is not None and fallback is not False else None
        self.sparse_keep = sparse_keep
        self.partial_loads = partial_loads and sparse_keep is not None and cache is not None
        self.bypass = bypass and cache is not None
        if cache is not None:
            cache.policy.bypass = self.bypass or self.partial_loads  # its ghost caches replay bypasses
        self.transit: torch.Tensor | None = None  # CUDA: the slot-sized buffer bypassed experts stream through
        self.device = device if device is not None else (cache.device if cache is not None else torch.device("cpu"))
        self.loader = AsyncLoader(streamer) if streamer is not None else None
        self.prefetch_queue: list[tuple[Key, float | None]] = []  # (key, probability or None: a demand miss)
        self.prefetch_min_prob = prefetch_min_prob
        self.prefetch_pins: list[Key] = []  # prefetched keys held until the next layer's experts are pinned
        self.hot: set[Key] = set()  # pinned for as long as `pin_hot` holds them
        self._slot_views: dict[int, tuple[Key, dict]] = {}  # slot -> (key, its projections)
        self._inplace: dict[Key, dict] = {}  # projections over the mapped pack (no cache)
        self._loaded: set[Key] = set()  # keys loaded in the current layer step
        self.mix_op = experts_op(self.device, self.backend)  # one token's experts in one C++ call (or None)
        self.stats = EngineStats()
        self.use_stats(self.stats)

    def use_stats(self, stats: EngineStats) -> None:
        """Count into `stats` from now on (the engine's accumulator; the cache's counters are its part)."""
        self.stats = stats
        if self.cache is not None:
            self.cache.stats = stats.cache

    # compatibility views of the accumulator
    @property
    def counts(self):
        return self.stats.counts

    @property
    def trace(self) -> list[Key]:
        return self.stats.trace

    @property
    def stall_s(self) -> float:
        return self.stats.stall_s

    @property
    def expert_calls(self) -> int:
        return self.stats.expert_calls

    def reset_counters(self) -> None:
        self.use_stats(EngineStats())

    def _projections(self, key: Key, blob: torch.Tensor) -> dict[str, Projection]:
        return expert_projections(blob, self.records[key], self.backend)

    # -- residency ---------------------------------------------------------------------------------------
    def _views(self, key: Key) -> dict[str, Projection]:
        """Projections of a resident expert (built once per load into its slot) or, without a cache, of the
        expert in place in the mapped pack (built once)."""
        if self.cache is None:
            projs = self._inplace.get(key)
            if projs is None:
                projs = self._inplace[key] = self._projections(key, self.pack.expert_blob(*key, verify=True))
            return projs
        slot = self.cache.where[key]
        held = self._slot_views.get(slot)
        if held is None or held[0] != key:
            blob = self.cache.buffer[slot, : self.records[key].nbytes]
            held = self._slot_views[slot] = (key, self._projections(key, blob))
        return held[1]

    def ensure(self, key: Key, *, wait: bool = True) -> dict[str, Projection]:
        """The expert's projections on the compute device, issuing its load if it is not resident (and, with
        `wait`, waiting for it: a load's error, such as a checksum mismatch, is raised here)."""
        if self.cache is not None and self.cache.lookup(key) is None:
            self.load(key)
        if wait:
            self._wait(key)
        return self._views(key)

    def keep_for(self, key: Key) -> float | None:
        """FloE keep fraction of this expert (None: dense)."""
        keep = self.sparse_keep.get(key, 1.0) if isinstance(self.sparse_keep, dict) else self.sparse_keep
        return None if keep is None or keep >= 1.0 else keep

    def bypasses(self, key: Key) -> bool:
        """Whether a miss of `key` may skip the cache: under bypass every expert, under partial loads the
        sparse ones (read as their kept rows)."""
        return self.bypass or (self.partial_loads and self.keep_for(key) is not None)

    def _acquire(self, key: Key) -> dict | None:
        """Like ensure, but a miss that may bypass the cache and that the policy does not admit returns None:
        it is computed without a slot (`_compute_bypassed`)."""
        if (self.cache is not None and key not in self.cache and self.bypasses(key)
                and not self.cache.admits(key)):
            self.cache.lookup(key)  # counts the miss
            return None
        return self.ensure(key, wait=False)

    def load(self, key: Key, *, prefetch: bool = False) -> None:
        nbytes = self.records[key].nbytes
        dst = self.cache.allocate(key, nbytes, prefetch=True) if prefetch else self.cache.allocate(key, nbytes)
        self.loader.submit(key, dst)
        self.stats.loads += 1
        if key in self._loaded:
            self.stats.duplicate_loads += 1
        self._loaded.add(key)

    def _wait(self, key: Key) -> None:
        if self.loader is not None:
            self.stats.stall_s += self.loader.wait(key)

    def pin_hot(self, keys) -> None:
        """Load `keys` (if needed) and keep them resident until `unpin_hot`."""
        if self.cache is None:
            return
        self._loaded = set()
        for key in dict.fromkeys(keys):
            if key not in self.cache:
                self.load(key)
            self.cache.pinned.add(key)
            self.hot.add(key)
        for key in self.hot:
            self._wait(key)

    def unpin_hot(self) -> None:
        for key in self.hot:
            self.cache.pinned.discard(key)
        self.hot = set()

    def _unpin(self, key: Key) -> None:
        if key not in self.hot:
            self.cache.pinned.discard(key)

    def drain(self) -> None:
        """Wait for every load in flight and release every prefetch pin (between runs)."""
        if self.loader is not None:
            self.stats.stall_s += self.loader.drain()
        if self.cache is not None and self.prefetch_pins:
            self._release_prefetch_pins(keep=set())
        self.prefetch_queue.clear()

    def close(self) -> None:
        self.drain()
        if self.cache is not None:
            self.unpin_hot()
        if self.loader is not None:
            self.loader.close()

    # -- prefetch ------------------------------------------------------------------------------------------
    def queue_prefetch(self, keys: list[Key], probs: list[float] | None = None) -> None:
        """Queue predicted experts, most wanted first; `probs[i]` is the chance that keys[i] is used at its
        layer's next visit (None: always worth trying, subject to admission)."""
        self.prefetch_queue.extend(zip(keys, probs if probs is not None else [None] * len(keys), strict=True))

    def _issue_prefetch(self) -> None:
        """Load queued experts into unpinned slots: each prediction hints the policy; it is loaded only if
        likely enough (`prefetch_min_prob`) and admitted over the key it would evict (never a pinned one or
        one just prefetched)."""
        queue, self.prefetch_queue = self.prefetch_queue, []
        cache, counts = self.cache, self.stats.counts
        if cache is None:
            return
        seen: set[Key] = set()
        for key, prob in queue:
            if key in seen:
                continue
            seen.add(key)
            if prob is not None:
                cache.hint(key, prob)
            if cache.refresh(key):  # resident: keep it
                continue
            if prob is not None and prob < self.prefetch_min_prob:
                counts["prefetch_unlikely"] += 1
                continue
            if len(cache.pinned) >= cache.slots:
                break
            # a demand miss the policy would not keep bypasses the cache (the same bytes, or only the kept rows):
            # a prefetch is then worth its bytes only if the expert is worth keeping after this use
            if not cache.admits(key, prob, beyond=self.bypasses(key)):
                counts["prefetch_not_admitted"] += 1
                continue
            self.load(key, prefetch=True)
            counts["prefetch_issued"] += 1
            cache.pinned.add(key)  # until the next layer has pinned what it uses
            self.prefetch_pins.append(key)

    def _release_prefetch_pins(self, keep: set[Key]) -> None:
        for key in self.prefetch_pins:
            if key not in keep:
                self._wait(key)  # its slot may be reused: its copy must be done
                self._unpin(key)
        self.prefetch_pins = []

    # -- big-little ----------------------------------------------------------------------------------------
    def _fallback(self, layer: int, topk_ids: torch.Tensor, active: torch.Tensor,
                  share: torch.Tensor) -> torch.Tensor:
        """A token that runs its big set but whose little share is at least `fallback` (important, but not by
        much: its big-only experts carry at most 1 - fallback of its router weight) drops a big-only expert
        that is not resident and runs its little set; the missing expert is queued for prefetch (so the next
        token may find it; gated like any). Tokens below the threshold always run their full set."""
        kl = max(1, topk_ids.shape[1] // 2)
        threshold = _at(self.fallback, layer)
        if threshold is None or self.cache is None or topk_ids.shape[1] <= kl:
            return active
        eligible = active[:, kl:].any(1) & (share >= threshold)  # [T]
        if not bool(eligible.any()):
            return active
        big, big_active = topk_ids[:, kl:], active[:, kl:]
        # loaded anyway: every little set, and the big sets of tokens that cannot fall back
        required = set(topk_ids[:, :kl].unique().tolist()) | set(big[big_active & ~eligible[:, None]].unique().tolist())
        optional = set(big[big_active & eligible[:, None]].unique().tolist()) - required
        missing = [e for e in sorted(optional) if (layer, e) not in self.cache]
        if missing:
            miss = torch.isin(big, torch.tensor(missing, device=big.device)) & big_active
            fall = miss.any(1) & eligible  # [T]
            active[:, kl:] &= ~fall[:, None]
            self.stats.counts["fallback_tokens"] += int(fall.sum())
            self.prefetch_queue[:0] = [((layer, e), None) for e in missing]
        return active

    # -- compute -------------------------------------------------------------------------------------------
    def _compute(self, key: Key, projs: dict | None, x: torch.Tensor) -> torch.Tensor:
        if projs is None:
            return self._compute_bypassed(key, x)
        keep = self.keep_for(key)
        counts = self.stats.counts
        if keep is None:
            if self.sparse_keep is not None:  # counted as all rows, so the kept share covers every expert
                counts["rows_kept"] += projs["gate"].rows * x.shape[0]
                counts["rows_total"] += projs["gate"].rows * x.shape[0]
            return expert_ffn(x, projs, self.backend, self.terms, key)
        y, n = sparse_ffn(x, projs, self.backend, keep, self.terms, key)
        counts["rows_kept"] += n * x.shape[0]
        counts["rows_total"] += projs["gate"].rows * x.shape[0]
        return y

    def _compute_bypassed(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """A miss not cached: only the kept rows (partial loads), or the whole expert streamed through. CUDA:
        through the streamer into the transit buffer (one slot's bytes, counted in the budget's workspace);
        CPU: used in place from the mapped pages, which are dropped afterwards, as after a copy into a slot."""
        rec = self.records[key]
        verify = self.streamer.verify if self.streamer else True
        if self.partial_loads and self.keep_for(key) is not None:
            blob = self.pack.expert_blob(*key, verify=verify)
            y, moved = partial_ffn(x, blob, rec, self.keep_for(key), self.backend, self.stats.counts,
                                   self.terms, key)
            self.pack.release(*key)
            self.cache.stats.moved(moved)
            return y
        if self.device.type == "cuda":
            if self.transit is None:
                self.transit = torch.empty(self.cache.slot_bytes, dtype=torch.uint8, device=self.device)
            blob = self.transit[: rec.nbytes]
            self.loader.submit(key, blob)
            self._wait(key)
            y = self._compute(key, self._projections(key, blob), x)
        else:
            y = self._compute(key, self._projections(key, self.pack.expert_blob(*key, verify=verify)), x)
            self.pack.release(*key)
        self.cache.stats.moved(rec.nbytes)
        self.stats.counts["streamed"] += 1
        return y

    def _route(self, layer: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """(flat expert id per (token, slot) with inactive slots as E, their counts per expert [E+1] as a list,
        weights) after big-little and fallback; tells the cache's policy what the layer wants."""
        n, e_count = topk_ids.shape[0], self.num_experts
        flat = topk_ids.reshape(-1)
        active = share = None
        threshold = _at(self.big_little, layer)
        if threshold is not None:  # little tokens drop their big-only experts
            share = little_share(topk_weights)
            little, active = big_little_mask(topk_weights, threshold, share)
            self.stats.counts["little_tokens"] += int(little.sum())
            flat = torch.where(active.reshape(-1), flat, e_count)
        if n == 1:  # one token: its ids are the grouping (the layer's one host sync)
            ids = flat.tolist()
            counts = [0] * (e_count + 1)
            for e in ids:
                counts[e] += 1
        else:
            counts = torch.bincount(flat, minlength=e_count + 1).tolist()  # the layer's one host sync
        if self.cache is not None:  # what this layer's tokens want (before any fallback, which depends on the cache)
            self.cache.visit(layer, {e: c for e, c in enumerate(counts[:e_count]) if c}, n)
        if active is not None:
            before = int(active.sum())
            active = self._fallback(layer, topk_ids, active, share)
            topk_weights = reweight(topk_weights, active)
            if int(active.sum()) != before:
                flat = torch.where(active.reshape(-1), topk_ids.reshape(-1), e_count)
                counts = torch.bincount(flat, minlength=e_count + 1).tolist()
        return flat, counts, topk_weights

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids/topk_weights [T, k] -> weighted sum of the routed experts' outputs [T, H]."""
        stats, cache, k = self.stats, self.cache, topk_ids.shape[1]
        stats.counts["tokens"] += x.shape[0]
        stats.layer_steps += 1
        self._loaded = set()
        flat, counts, topk_weights = self._route(layer, topk_ids, topk_weights)
        experts = [e for e, c in enumerate(counts[: self.num_experts]) if c]
        ends = list(accumulate(counts[e] for e in experts))
        order = experts
        if cache is not None:  # resident ones first: they compute while the missing ones stream in
            stats.trace.extend((layer, e) for e in experts)  # demand accesses, for the Belady bound
            order = sorted(experts, key=lambda e: (layer, e) not in cache)
            if self.prefetch_pins:  # resident ones are pinned below; unused predictions become evictable
                self._release_prefetch_pins(keep={(layer, e) for e in order if (layer, e) in cache})
        views: dict[int, dict | None] = {}
        deferred = False
        for e in order:  # pin hits and issue loads for as many misses as unpinned slots allow
            key = (layer, e)
            if cache is not None and len(cache.pinned) >= cache.slots and key not in cache.pinned:
                deferred = True
                break
            views[e] = self._acquire(key)
            if cache is not None and views[e] is not None:
                cache.pinned.add(key)
        if deferred:
            self.prefetch_queue.clear()  # no room: this layer's own experts come first
        elif self.prefetch_queue:
            self._issue_prefetch()
        one = x.shape[0] == 1  # one token: every expert reads x itself, no gather or scatter
        if one:
            weight = dict(zip(flat.tolist(), topk_weights[0].tolist(), strict=True))
            if self.mix_op is not None and experts and not deferred and self.terms is None:  # fused_decode.py
                y = experts_one_token(self, layer, x, order, views, weight)
                if y is not None:
                    return y
        else:  # (token, slot) pairs grouped by expert, in expert-id order: one sort, one gather
            sel = torch.argsort(flat, stable=True)[: ends[-1]] if experts else flat[:0]
            tok = torch.div(sel, k, rounding_mode="floor")
            xs = x.index_select(0, tok)  # [M, H]
            where = {e: (end - counts[e], end) for e, end in zip(experts, ends, strict=True)}
        ys: dict[int, torch.Tensor] = {}
        for e in order:
            key = (layer, e)
            projs = views.pop(e) if e in views else self._acquire(key)
            if cache is not None and projs is not None:
                cache.pinned.add(key)
            self._wait(key)
            a, b = (0, 1) if one else where[e]
            ys[e] = self._compute(key, projs, x if one else xs[a:b])
            stats.expert_calls += 1
            stats.expert_tokens += b - a
            if cache is not None:
                self._unpin(key)
        if not experts:
            return torch.zeros_like(x)
        if one:  # summed in expert-id order, as the index_add below would
            out = None
            for e in experts:
                v = ys[e] * weight[e]
                out = v if out is None else out + v
            return out.to(x.dtype)
        out = torch.zeros_like(x)
        y = ys[experts[0]] if len(experts) == 1 else torch.cat([ys[e] for e in experts])  # expert-id order
        y = y * topk_weights.reshape(-1).index_select(0, sel)[:, None].to(y.dtype)
        return out.index_add_(0, tok, y.to(out.dtype))  # per token, summed in expert-id order
