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


def visits(trace: Sequence[Key], start: int = 0) -> list[tuple[int, list[Key], int]]:
    """The trace cut into layer visits: (layer, its keys, index of the first) for each run of one layer (the
    executor records a visit's experts together), with a cut at `start` too."""
    out: list[tuple[int, list[Key], int]] = []
    for i, key in enumerate(trace):
        if out and out[-1][0] == key[0] and i != start:
            out[-1][1].append(key)
        else:
            out.append((key[0], [key], i))
    return out


def lookahead(trace: Sequence[Key], slots: int, layers: Sequence[int], top_k: int, tokens_ahead: int, *,
              start: int = 0, nbytes: Callable[[Key], int] | None = None) -> BeladyResult:
    """Misses on trace[start:] of the reuse policy (moepack.runtime.cache.Reuse, as the runtime builds it)
    told the exact routing of the next `tokens_ahead` tokens: Belady's MIN with that horizon. On a miss it
    evicts, among the resident keys not used within the horizon, the one the policy expects farthest away; if
    every one is used within it, the one used last (MIN's choice). 0: the policy alone; 1: it knows every layer of the current token (a perfect
    next-layer predictor); more: foresight of tokens not generated yet, which no decoder has. The curve shows
    how much of MIN's advantage needs knowledge of future tokens. Every decode token visits each layer
    once; the cache starts at `start` with MIN's free warm set and the policy's frequencies from the prefix
    (each prefix visit counted as len / top_k tokens)."""
    from moepack.runtime.cache import make_policy

    if slots < 1:
        raise ValueError("lookahead needs at least one slot")
    start = min(max(start, 0), len(trace))
    nxt = next_uses(trace)
    upcoming: dict[Key, int] = {}
    for i in range(start):
        upcoming[trace[i]] = nxt[i]
    resident = {key for key, _ in sorted(upcoming.items(), key=lambda kv: kv[1])[:slots]}
    policy = make_policy("reuse", slots=slots, layers=list(layers))
    window = tokens_ahead * len(layers) * top_k  # accesses: a decode token routes top_k experts per layer
    misses = moved = 0
    for layer, keys, first in visits(trace, start):
        decode = first >= start
        uses: dict[int, int] = {}
        for key in keys:
            uses[key[1]] = uses.get(key[1], 0) + 1
        policy.visit(layer, uses, 1 if decode else max(1, round(len(keys) / top_k)))
        if not decode:
            continue
        for j, key in enumerate(keys):
            i = first + j
            policy.access(key)
            if key in resident:
                policy.touch(key)
                continue
            misses += 1
            moved += nbytes(key) if nbytes is not None else 0
            if len(resident) >= slots:
                candidates = [k for k in resident if k not in keys] or [k for k in resident if k != key]
                ahead: dict[Key, int] = {}  # first use of each key within the horizon
                for n, k in enumerate(trace[i:i + window]):
                    ahead.setdefault(k, n)
                victim = max(candidates, key=lambda k: (ahead.get(k, NEVER), policy.distance(k)))
                resident.discard(victim)
                policy.remove(victim)
            resident.add(key)
            policy.insert(key)
    return BeladyResult(len(trace) - start, misses, moved)


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
