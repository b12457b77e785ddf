"""The streaming expert executor: runs a layer's routed experts from the budgeted cache.

Per layer: every needed expert that is resident is pinned, every missing one gets a slot and its load is
issued at once (on CUDA they all stream while the resident ones compute); then the prefetch queue (experts
predicted for the next layer, see runtime/prefetch.py) is issued into unpinned slots; then the experts are
computed, resident ones first, each unpinned once done so a later load may reuse its slot. Outputs are summed
in expert-id order whatever the compute order, so the cache state never changes the numbers.

Before a layer runs, the cache's policy is told which experts its tokens route to (`ExpertCache.visit`), so
policies that estimate reuse (`reuse`) can follow the layer cycle.

Prefetches are gated: a prediction comes with a probability (the prefetcher's measured hit rate for that
kind of prediction); below `prefetch_min_prob` it is only a hint to the policy, and a prediction is loaded
only when the policy admits it over the expert it would evict (`ExpertCache.admits`), so a prefetch never
displaces an expert the policy values more. Under partial loads the predicted use would be served by a
cheaper partial read anyway, so a prediction is admitted only if the expert is worth keeping after that use
(`beyond`): a whole-expert prefetch of an expert the policy would not cache moved up to twice the bytes of
the partial reads it replaced (toy model, 25% budget).

Bypass (`bypass`): a miss the policy does not admit over the expert it would evict is not cached; the whole
expert streams through a transit buffer (CUDA) or is used in place from the mapped pages (CPU), so a rarely
used expert moves its bytes once without displacing one the policy values more (cache admission; with it an
online policy can approach the best static cache, which Belady's MIN, caching every miss, cannot express).

Optional adaptive execution (runtime/adaptive.py): big-little routing (`big_little` threshold; a token whose
little share is at least `fallback` also drops a big expert that is not resident, see `_fallback`) and FloE
channel sparsity (`sparse_keep`), optionally with partial loads: a resident expert computes from its slot; a
miss the policy admits is loaded whole into a slot (and later tokens hit it); a miss it does not admit moves
only up and the kept rows of gate/down, straight from the pack, and is not cached (a bypass that reads only
the rows it needs)."""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.nn.functional as F

from moepack.format import Pack, projection_parts
from moepack.format.constants import PROJECTIONS
from moepack.kernels import Backend, matmul, matmul_t
from moepack.runtime.adaptive import big_little_mask, little_share, reweight, row_runs, select_channels
from moepack.runtime.cache import ExpertCache
from moepack.runtime.streamer import Streamer

PREFETCH_MIN_PROB = 0.75  # predictions less likely than this are hints only (see benchmarks/bench_prefetch.py)
FALLBACK_SHARE = 0.7  # big-little: tokens whose little half carries less router weight never fall back

Key = tuple[int, int]


def expert_ffn(x: torch.Tensor, projs: dict, backend: Backend) -> torch.Tensor:
    """SwiGLU expert on channel-major projections: down(silu(gate(x)) * up(x)).  x [T, H] -> [T, H]."""
    g = matmul(x, *projs["gate"], backend=backend)  # [T, I]
    u = matmul(x, *projs["up"], backend=backend)  # [T, I]
    return matmul_t(F.silu(g) * u, *projs["down"], backend=backend)  # [T, H]


def sparse_ffn(x: torch.Tensor, projs: dict, backend: Backend, keep: float) -> tuple[torch.Tensor, int]:
    """FloE: up(x) in full, then gate and down on the channels of largest |up| only. -> ([T, H], rows used)."""
    u = matmul(x, *projs["up"], backend=backend)  # [T, I]
    rows, mask = select_channels(u, keep)  # [n], [T, n] | None
    h = F.silu(matmul(x, *projs["gate"], rows=rows, backend=backend)) * u[:, rows]  # [T, n]
    if mask is not None:
        h = h * mask
    return matmul_t(h, *projs["down"], rows=rows, backend=backend), rows.numel()


def _at(threshold: float | dict[int, float] | None, layer: int) -> float | None:
    """One threshold, or this layer's (a layer without one: off)."""
    return threshold.get(layer) if isinstance(threshold, dict) else threshold


def _rowwise(name: str) -> bool:
    return name != "lr_v"  # every part but the low-rank right factor has one row per channel


class StreamingExecutor:
    def __init__(self, pack: Pack, cache: ExpertCache | None, streamer: Streamer | None, *,
                 backend: Backend = Backend.AUTO, big_little: float | dict[int, float] | None = None,
                 fallback: float | dict[int, float] | None = FALLBACK_SHARE,
                 sparse_keep: float | dict[Key, float] | None = None, partial_loads: bool = False,
                 bypass: bool = False, device: torch.device | None = None,
                 prefetch_min_prob: float = PREFETCH_MIN_PROB):
        """With `cache=None` every expert is used in place from the mapped pack (CPU, no budget).
        `big_little` and `fallback` are one threshold or one per layer, `sparse_keep` one keep fraction or
        one per expert (`auto`, runtime/adaptive.py); a keep of 1.0 runs that expert dense."""
        self.pack, self.cache, self.streamer, self.backend = pack, cache, streamer, backend
        self.records = pack.expert_records
        self.big_little = big_little
        self.fallback = fallback if big_little is not None else None  # a little-share threshold, or None: off
        self.sparse_keep = sparse_keep
        self.partial_loads = partial_loads and sparse_keep is not None and cache is not None
        self.bypass = bypass and cache is not None
        if cache is not None:
            cache.policy.bypass = self.bypass or self.partial_loads  # its ghost caches replay bypasses
        self.transit: torch.Tensor | None = None  # CUDA: the slot-sized buffer bypassed experts stream through
        self.device = device if device is not None else (cache.device if cache is not None else torch.device("cpu"))
        self.pending: dict[Key, torch.cuda.Event] = {}
        self.prefetch_queue: list[tuple[Key, float | None]] = []  # (key, probability or None: a demand miss)
        self.prefetch_min_prob = prefetch_min_prob
        self.prefetch_pins: list[Key] = []  # prefetched keys held until the next layer's experts are pinned
        self.trace: list[Key] = []  # every demand access, in order (for the Belady bound)
        self.stall_s = 0.0  # time compute waited for transfers
        self.expert_calls = 0
        self.counts: Counter[str] = Counter()  # tokens, little_tokens, fallback_tokens, rows_*, partial_*, prefetch_*

    def reset_counters(self) -> None:
        self.trace.clear()
        self.counts.clear()

    def _projections(self, key: Key, blob: torch.Tensor) -> dict:
        rec = self.records[key]
        return {p: (projection_parts(blob, rec.projections[p]), rec.projections[p].recipe, rec.projections[p].shape)
                for p in PROJECTIONS}

    # -- residency ---------------------------------------------------------------------------------------
    def ensure(self, key: Key) -> torch.Tensor:
        """The expert's blob on the compute device, issuing its load if it is not resident."""
        if self.cache is None:
            return self.pack.expert_blob(*key, verify=True)
        blob = self.cache.lookup(key)
        if blob is not None:
            return blob[: self.records[key].nbytes]
        return self.load(key)

    def keep_for(self, key: Key) -> float | None:
        """FloE keep fraction of this expert (None: dense)."""
        keep = self.sparse_keep.get(key, 1.0) if isinstance(self.sparse_keep, dict) else self.sparse_keep
        return None if keep is None or keep >= 1.0 else keep

    def bypasses(self, key: Key) -> bool:
        """Whether a miss of `key` may skip the cache: under bypass every expert, under partial loads the
        sparse ones (read as their kept rows)."""
        return self.bypass or (self.partial_loads and self.keep_for(key) is not None)

    def _acquire(self, key: Key) -> torch.Tensor | None:
        """Like ensure, but a miss that may bypass the cache and that the policy does not admit returns None:
        it is computed without a slot (`_compute_streamed`, or `_compute_partial` for a sparse expert)."""
        if (self.cache is not None and key not in self.cache and self.bypasses(key)
                and not self.cache.admits(key)):
            self.cache.lookup(key)  # counts the miss
            return None
        return self.ensure(key)

    def load(self, key: Key, *, prefetch: bool = False) -> torch.Tensor:
        nbytes = self.records[key].nbytes
        dst = self.cache.allocate(key, nbytes, prefetch=True) if prefetch else self.cache.allocate(key, nbytes)
        event = self.streamer.load(key, dst)
        if event is not None:
            self.pending[key] = event
        return dst

    def _wait(self, key: Key) -> None:
        event = self.pending.pop(key, None)
        if event is not None:
            t0 = time.perf_counter()
            if not event.query():
                event.synchronize()
                self.stall_s += time.perf_counter() - t0
            torch.cuda.current_stream().wait_event(event)

    def queue_prefetch(self, keys: list[Key], probs: list[float] | None = None) -> None:
        """Queue predicted experts, most wanted first; `probs[i]` is the chance that keys[i] is used at its
        layer's next visit (None: always worth trying, subject to admission)."""
        self.prefetch_queue.extend(zip(keys, probs if probs is not None else [None] * len(keys), strict=True))

    def _issue_prefetch(self) -> None:
        """Load queued experts into unpinned slots: each prediction hints the policy; it is loaded only if
        likely enough (`prefetch_min_prob`) and admitted over the key it would evict (never a pinned one or
        one just prefetched)."""
        queue, self.prefetch_queue = self.prefetch_queue, []
        cache = self.cache
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
                self.counts["prefetch_unlikely"] += 1
                continue
            if len(cache.pinned) >= cache.slots:
                break
            # a demand miss the policy would not keep bypasses the cache (the same bytes, or only the kept rows):
            # a prefetch is then worth its bytes only if the expert is worth keeping after this use
            if not cache.admits(key, prob, beyond=self.bypasses(key)):
                self.counts["prefetch_not_admitted"] += 1
                continue
            self.load(key, prefetch=True)
            self.counts["prefetch_issued"] += 1
            cache.pinned.add(key)  # until the next layer has pinned what it uses
            self.prefetch_pins.append(key)

    def _release_prefetch_pins(self, keep: set[Key]) -> None:
        for key in self.prefetch_pins:
            if key not in keep:
                self.cache.pinned.discard(key)
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
            self.counts["fallback_tokens"] += int(fall.sum())
            self.prefetch_queue[:0] = [((layer, e), None) for e in missing]
        return active

    # -- compute -------------------------------------------------------------------------------------------
    def _compute(self, key: Key, blob: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if blob is None:  # bypassed: only the rows it needs, or the whole expert streamed through
            if self.partial_loads and self.keep_for(key) is not None:
                return self._compute_partial(key, x)
            return self._compute_streamed(key, x)
        projs = self._projections(key, blob)
        keep = self.keep_for(key)
        if keep is None:
            if self.sparse_keep is not None:  # counted as all rows, so the kept share covers every expert
                self.counts["rows_kept"] += projs["gate"][2][0] * x.shape[0]
                self.counts["rows_total"] += projs["gate"][2][0] * x.shape[0]
            return expert_ffn(x, projs, self.backend)
        y, n = sparse_ffn(x, projs, self.backend, keep)
        self.counts["rows_kept"] += n * x.shape[0]
        self.counts["rows_total"] += projs["gate"][2][0] * x.shape[0]
        return y

    def _compute_streamed(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """A bypassed miss: the whole expert, not cached. CUDA: through the streamer into the transit buffer (one
        slot's bytes, counted in the budget's workspace); CPU: used in place from the mapped pages, which are
        dropped afterwards, as after a copy into a slot."""
        nbytes = self.records[key].nbytes
        if self.device.type == "cuda":
            if self.transit is None:
                self.transit = torch.empty(self.cache.slot_bytes, dtype=torch.uint8, device=self.device)
            blob = self.transit[:nbytes]
            event = self.streamer.load(key, blob)
            if event is not None:
                self.pending[key] = event
                self._wait(key)
        else:
            blob = self.pack.expert_blob(*key, verify=self.streamer.verify if self.streamer else True)
        y = self._compute(key, blob, x)
        if self.device.type != "cuda":
            self.pack.release(*key)
        self.cache.stats.bytes_loaded += nbytes
        self.counts["streamed"] += 1
        return y

    def _compute_partial(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """A miss under partial loads: up moves whole; gate and down only for the kept rows (each contiguous
        run of rows is one byte range per part). Nothing is cached."""
        rec = self.records[key]
        blob = self.pack.expert_blob(*key, verify=self.streamer.verify if self.streamer else True)
        dev, moved = x.device, 0
        up_rec = rec.projections["up"]
        up = {k: v.to(dev) for k, v in projection_parts(blob, up_rec).items()}
        moved += sum(p.nbytes for p in up_rec.parts)
        u = matmul(x, up, up_rec.recipe, up_rec.shape, backend=self.backend)  # [T, I]
        rows, mask = select_channels(u, self.keep_for(key))
        rows_cpu = rows.cpu()
        compact = {}
        for p in ("gate", "down"):
            prec = rec.projections[p]
            parts = {}
            for name, t in projection_parts(blob, prec).items():
                part = t.index_select(0, rows_cpu) if _rowwise(name) else t
                parts[name] = part.to(dev)
                moved += part.numel() * part.element_size()
            compact[p] = (parts, prec.recipe, (rows.numel(), prec.shape[1]))
        self.pack.release(*key)
        h = F.silu(matmul(x, *compact["gate"], backend=self.backend)) * u[:, rows]
        if mask is not None:
            h = h * mask
        full = sum(p.nbytes for prec in rec.projections.values() for p in prec.parts)
        self.cache.stats.bytes_loaded += moved
        self.counts["partial_loads"] += 1
        self.counts["partial_runs"] += row_runs(rows_cpu.tolist())  # contiguous reads per part of gate / down
        self.counts["partial_rows"] += rows.numel()
        self.counts["partial_bytes"] += moved
        self.counts["partial_bytes_saved"] += full - moved
        self.counts["rows_kept"] += rows.numel() * x.shape[0]
        self.counts["rows_total"] += up_rec.shape[0] * x.shape[0]
        return matmul_t(h, *compact["down"], backend=self.backend)

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids/topk_weights [T, k] -> weighted sum of the routed experts' outputs [T, H]."""
        self.counts["tokens"] += x.shape[0]
        cache = self.cache
        active = None
        threshold = _at(self.big_little, layer)
        if threshold is not None:  # little tokens drop their big-only experts
            share = little_share(topk_weights)
            little, active = big_little_mask(topk_weights, threshold, share)
            self.counts["little_tokens"] += int(little.sum())
        if cache is not None:  # what this layer's tokens want (before any fallback, which depends on the cache)
            wanted = topk_ids if active is None else topk_ids[active]
            ids, n = wanted.unique(return_counts=True)
            cache.visit(layer, dict(zip(ids.tolist(), n.tolist(), strict=True)), x.shape[0])
        if active is not None:
            active = self._fallback(layer, topk_ids, active, share)
            topk_weights = reweight(topk_weights, active)
            experts = sorted(topk_ids[active].unique().tolist())
        else:
            experts = sorted(topk_ids.unique().tolist())
        self.trace.extend((layer, e) for e in experts)
        order = list(experts)
        if cache is not None:  # resident ones first: they compute while the missing ones stream in
            order.sort(key=lambda e: (layer, e) not in cache)
        blobs: dict[int, torch.Tensor | None] = {}
        deferred = False
        if self.prefetch_pins:  # resident ones are pinned below; unused predictions become evictable
            self._release_prefetch_pins(keep={(layer, e) for e in order if (layer, e) in cache})
        for e in order:  # pin hits and issue loads for as many misses as unpinned slots allow
            key = (layer, e)
            if cache is not None and len(cache.pinned) >= cache.slots:
                deferred = True
                break
            blobs[e] = self._acquire(key)
            if cache is not None and blobs[e] is not None:
                cache.pinned.add(key)
        if deferred:
            self.prefetch_queue.clear()  # no room: this layer's own experts come first
        elif self.prefetch_queue:
            self._issue_prefetch()
        outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e in order:
            key = (layer, e)
            if e in blobs:
                blob = blobs.pop(e)
            else:
                blob = self._acquire(key)
                if cache is not None and blob is not None:
                    cache.pinned.add(key)
            self._wait(key)
            hit = topk_ids == e
            if active is not None:
                hit &= active
            tok, slot = hit.nonzero(as_tuple=True)
            y = self._compute(key, blob, x[tok])
            outs[e] = (tok, y * topk_weights[tok, slot, None])
            self.expert_calls += 1
            if cache is not None:
                cache.pinned.discard(key)
        out = torch.zeros_like(x)
        for e in experts:  # a fixed order: the same sums whatever was resident
            tok, y = outs[e]
            out.index_add_(0, tok, y.to(out.dtype))
        return out
