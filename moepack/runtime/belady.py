"""Belady's MIN: the optimal offline cache on a recorded trace of expert accesses, the lower bound on the
misses (and so the bytes moved) of any policy with the same number of equal slots and no bypass.

The executor records every demand access `(layer, expert)` in order (`StreamingExecutor.trace`). MIN evicts,
on a miss with a full cache, the resident key whose next use is farthest away (never used again first)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Key = tuple[int, int]
NEVER = 1 << 62


@dataclass(frozen=True)
class BeladyResult:
    accesses: int
    misses: int
    bytes: int  # bytes of the missed experts

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.misses / self.accesses if self.accesses else 1.0


def next_uses(trace: Sequence[Key]) -> list[int]:
    """For each position i, the position of the next access to trace[i] (NEVER if none)."""
    nxt = [NEVER] * len(trace)
    seen: dict[Key, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = seen.get(trace[i], NEVER)
        seen[trace[i]] = i
    return nxt


def belady(trace: Sequence[Key], slots: int, *, nbytes: Callable[[Key], int] | None = None,
           start: int = 0) -> BeladyResult:
    """Misses of the optimal cache with `slots` slots on `trace`. With `start` > 0 only the accesses from
    `start` on count, and the cache begins there holding, for free, the best `slots` of the keys accessed
    before (those used again soonest): a lower bound for any demand-loading policy on that segment, however
    it spent the prefix (e.g. the decode steps after a prefill)."""
    if slots < 1:
        raise ValueError("Belady needs at least one slot")
    start = min(max(start, 0), len(trace))
    nxt = next_uses(trace)
    resident: dict[Key, int] = {}  # key -> its next use
    heap: list[tuple[int, Key]] = []  # (-next use, key); stale entries skipped lazily
    if start:
        upcoming: dict[Key, int] = {}  # next use at or after `start` of every key seen before it
        for i in range(start):
            upcoming[trace[i]] = nxt[i]
        for key, use in sorted(upcoming.items(), key=lambda kv: kv[1])[:slots]:
            resident[key] = use
            heapq.heappush(heap, (-use, key))
    misses = moved = 0
    for i in range(start, len(trace)):
        key = trace[i]
        if key not in resident:
            misses += 1
            moved += nbytes(key) if nbytes is not None else 0
            if len(resident) >= slots:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) == -neg:
                        del resident[victim]
                        break
        resident[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return BeladyResult(len(trace) - start, misses, moved)


def static_best(trace: Sequence[Key], slots: int, *, nbytes: Callable[[Key], int] | None = None,
                start: int = 0) -> BeladyResult:
    """Misses of the best *static* cache on trace[start:]: the `slots` keys it uses most, resident from the
    start for free; every other access misses and bypasses the cache (so at very few slots this can beat
    Belady's MIN, which must cache every miss). When routing is independent from token to token, keeping the
    most probable experts is the best any policy without knowledge of the future can expect to do (the
    independent reference model's A0), and here the frequencies are even known in hindsight. The gap between
    this and Belady is what only foresight of the order buys."""
    if slots < 1:
        raise ValueError("a static cache needs at least one slot")
    segment = trace[min(max(start, 0), len(trace)):]
    counts: dict[Key, int] = {}
    for key in segment:
        counts[key] = counts.get(key, 0) + 1
    kept = set(sorted(counts, key=lambda k: -counts[k])[:slots])
    missed = [k for k in segment if k not in kept]
    return BeladyResult(len(segment), len(missed), sum(nbytes(k) for k in missed) if nbytes is not None else 0)


def independent_bound(trace: Sequence[Key], slots: int, top_k: int, *, start: int = 0, tokens: int = 4000,
                      seed: int = 0) -> tuple[BeladyResult, BeladyResult]:
    """(MIN, best static) misses on a synthetic trace with trace[start:]'s per-layer expert frequencies but
    routing drawn independently per token (top_k distinct experts per layer, layers in the trace's order).

    Under independent routing the best static cache is what the best online policy can expect (it knows the
    probabilities, not the order), so static / MIN here is how close to Belady any online policy could come on
    routing with these frequencies and no memory: a ratio above an aim means caching alone cannot meet it."""
    segment = trace[min(max(start, 0), len(trace)):]
    counts: dict[int, dict[int, int]] = {}
    for layer, e in segment:
        counts.setdefault(layer, {})
        counts[layer][e] = counts[layer].get(e, 0) + 1
    rng = random.Random(seed)
    synthetic: list[Key] = []
    for _ in range(tokens):
        for layer, c in counts.items():
            experts, weights = list(c), list(c.values())
            picks: list[int] = []
            k = min(top_k, len(experts))
            while len(picks) < k:  # weighted, without replacement
                i = rng.choices(range(len(experts)), weights)[0]
                picks.append(experts.pop(i))
                weights.pop(i)
            synthetic += [(layer, e) for e in picks]
    return belady(synthetic, slots), static_best(synthetic, slots)


def simulate(trace: Sequence[Key], slots: int, policy: str = "lru", **kw) -> int:
    """Misses of an online policy (moepack.runtime.cache) on the same trace, for comparison with MIN."""
    from moepack.runtime.cache import make_policy

    pol = make_policy(policy, slots=slots, **kw)
    resident: set[Key] = set()
    misses = 0
    for key in trace:
        if key in resident:
            pol.touch(key)
            continue
        misses += 1
        if len(resident) >= slots:
            victim = pol.victim(list(resident), key)
            resident.discard(victim)
            pol.remove(victim)
        resident.add(key)
        pol.insert(key)
    return misses
