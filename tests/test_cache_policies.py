"""Expert cache policies on hand-made access sequences, and Belady's MIN as their lower bound."""

from __future__ import annotations

import random

import pytest
import torch

from moepack.runtime.belady import (
    belady,
    independent_bound,
    lookahead,
    next_uses,
    simulate,
    static_best,
    visits,
)
from moepack.runtime.cache import LFU, ExpertCache, FateQuota, Reuse, quotas_from_recall, shallow_quotas


def run(cache: ExpertCache, keys) -> list:
    """Access keys in order (miss -> allocate); return the evicted keys in order."""
    evicted = []
    real = cache.evict

    def evict(key):
        evicted.append(key)
        real(key)

    cache.evict = evict
    for k in keys:
        if cache.lookup(k) is None:
            cache.allocate(k, 8)
        assert len(cache) <= cache.slots
    return evicted


def test_lru_evicts_least_recently_used():
    c = ExpertCache(3, 8, "cpu", "lru")
    ev = run(c, [(0, 0), (0, 1), (0, 2), (0, 0), (0, 3), (0, 4), (0, 0), (0, 5)])
    assert ev == [(0, 1), (0, 2), (0, 3)]
    assert c.stats.hits == 2 and c.stats.misses == 6 and c.stats.bytes_loaded == 48


def test_lfu_evicts_least_frequently_used_ties_by_recency():
    c = ExpertCache(2, 8, "cpu", "lfu")
    ev = run(c, [(0, 0), (0, 0), (0, 1), (0, 2), (0, 1), (0, 0)])
    # (0,2) arrives: (0,1) has 1 use vs (0,0) 2 -> evict (0,1); (0,1) again: (0,2)=1 use -> evict (0,2)
    assert ev == [(0, 1), (0, 2)]


def test_fate_quota_replaces_within_a_full_layer_and_takes_from_over_quota_layers():
    pol = FateQuota({0: 2.0, 1: 1.0})
    c = ExpertCache(3, 8, "cpu", pol)
    ev = run(c, [(0, 0), (0, 1), (1, 0), (1, 1)])  # layer 1 at quota: its own LRU goes, not the older layer 0
    assert ev == [(1, 0)]
    ev = run(c, [(1, 2), (0, 2)])
    # (1,2) replaces (1,1) (layer 1 full); (0,2): layer 0 at quota 2 -> its own LRU (0,0)
    assert ev == [(1, 1), (0, 0)]


def test_fate_quota_under_quota_layer_takes_from_over_quota_layer():
    pol = FateQuota({0: 3.0, 1: 1.0})
    c = ExpertCache(4, 8, "cpu", pol)
    run(c, [(1, 0), (1, 1), (1, 2), (0, 0)])  # layer 1 holds 3 > quota 1
    ev = run(c, [(0, 1)])  # layer 0 under quota: evict layer 1's LRU
    assert ev == [(1, 0)]


def test_quota_helpers_sum_to_slots_and_favour_shallow_layers():
    q = shallow_quotas(30, [0, 1, 2, 3])
    assert sum(q.values()) == pytest.approx(30) and q[0] > q[1] > q[2] > q[3] and q[0] == pytest.approx(2 * q[3])
    r = quotas_from_recall(10, {0: 0.0, 1: 0.5, 2: 0.9})
    assert sum(r.values()) == pytest.approx(10) and r[0] > r[1] > r[2]


def test_pinned_keys_are_never_evicted_and_prefetch_counters():
    c = ExpertCache(2, 8, "cpu", "lru")
    c.allocate((0, 0), 8)
    c.pinned.add((0, 0))
    c.allocate((0, 1), 8, prefetch=True)
    c.allocate((0, 2), 8)  # must evict (0,1), the only unpinned one: a wasted prefetch
    assert (0, 0) in c and (0, 1) not in c
    assert c.stats.prefetch_loads == 1 and c.stats.prefetch_wasted == 1
    c.pinned.add((0, 2))
    with pytest.raises(RuntimeError, match="pinned"):
        c.allocate((0, 3), 8)
    c.pinned.clear()
    c.allocate((0, 3), 8, prefetch=True)
    assert c.lookup((0, 3)) is not None and c.stats.prefetch_used == 1


def test_prefetched_keys_enter_as_next_victim():
    c = ExpertCache(3, 8, "cpu", "lru")
    run(c, [(0, 0), (0, 1)])
    c.allocate((1, 0), 8, prefetch=True)
    ev = run(c, [(0, 2)])
    assert ev == [(1, 0)]  # a wrong prediction displaces no useful expert


def test_belady_textbook_sequence():
    # the classic reference string 7 0 1 2 0 3 0 4 2 3 0 3 2 1 2 0 1 7 0 1 with 3 frames: 9 faults (OPT)
    refs = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    trace = [(0, r) for r in refs]
    assert belady(trace, 3).misses == 9
    assert simulate(trace, 3, "lru") == 12  # LRU: 12 faults (same textbook)
    assert belady(trace, 4).misses == 8
    res = belady(trace, 3, nbytes=lambda k: 10, start=10)
    assert res.accesses == 10 and res.bytes == 10 * res.misses


def test_static_best_keeps_the_most_used_keys():
    refs = [1, 2, 1, 3, 1, 2, 4, 1]  # counts: 1 x4, 2 x2, 3 x1, 4 x1
    trace = [(0, r) for r in refs]
    assert static_best(trace, 1).misses == 4 and static_best(trace, 2).misses == 2
    res = static_best(trace, 1, nbytes=lambda k: 10, start=4)  # [1, 2, 4, 1]: keeps 1
    assert res.accesses == 4 and res.misses == 2 and res.bytes == 20
    rng = random.Random(0)
    iid = [(0, min(int(rng.expovariate(0.3)), 15)) for _ in range(2000)]
    misses = [static_best(iid, slots).misses for slots in (1, 2, 4, 8, 16)]
    assert misses == sorted(misses, reverse=True) and misses[-1] == 0


def test_independent_bound_resamples_the_frequencies_and_orders_the_bounds():
    rng = random.Random(1)
    trace = []
    for _ in range(300):
        for layer in range(3):
            picks = rng.sample(range(6), 2) if layer else [0, 1]  # layer 0 always routes to experts 0 and 1
            trace += [(layer, e) for e in picks]
    opt, static = independent_bound(trace, 8, 2, start=60, tokens=500)
    assert opt.accesses == static.accesses == 500 * 3 * 2
    assert opt.misses <= static.misses  # MIN is never worse than any cache that bypasses no more
    opt_all, static_all = independent_bound(trace, 14, 2, tokens=200)  # every key fits: no misses at all
    assert static_all.misses == 0 and opt_all.misses == 14  # MIN starts cold: one compulsory miss per key
    one_token = independent_bound(trace[:6], 2, 2, tokens=100)[1]  # 6 keys seen once each: 2 kept, 4 miss
    assert one_token.misses == 4 * 100


def test_lookahead_needs_a_horizon_to_beat_a_cycle():
    # one layer, one expert per token, a cycle of 3 through 2 slots: the policy alone ranks by decayed
    # frequency, nearly equal, and often evicts the key needed next; a horizon of 2 tokens sees it (MIN)
    trace = [(0, e % 3) for e in range(60)]
    assert lookahead(trace, 2, [0], 1, 0, start=3).misses > 35
    assert lookahead(trace, 2, [0], 1, 2, start=3).misses == belady(trace, 2, start=3).misses == 28
    res = lookahead(trace, 2, [0], 1, 2, start=3, nbytes=lambda k: 10)
    assert res.accesses == 57 and res.bytes == 10 * res.misses


@pytest.mark.parametrize("seed", range(3))
def test_lookahead_between_the_policy_and_belady(seed):
    rng = random.Random(seed)
    trace = []
    for _ in range(150):
        for layer in range(3):
            trace += [(layer, e) for e in sorted(rng.sample(range(6), 2 if layer else 1))]
    start = 30
    for slots in (3, 6, 10):
        opt = belady(trace, slots, start=start).misses
        curve = [lookahead(trace, slots, [0, 1, 2], 2, w, start=start).misses for w in (0, 1, 4, 200)]
        assert all(opt <= m for m in curve), (slots, curve)
        assert curve[-1] < curve[0] or curve[0] == opt, (slots, curve)  # foresight helps
    single = [(0, rng.randrange(5)) for _ in range(300)]  # one access per visit: a full horizon is MIN itself
    assert lookahead(single, 3, [0], 1, 300, start=10).misses == belady(single, 3, start=10).misses


def test_visits_cut_runs_of_one_layer_and_at_start():
    trace = [(0, 1), (0, 2), (1, 0), (0, 3), (0, 4)]
    assert visits(trace) == [(0, [(0, 1), (0, 2)], 0), (1, [(1, 0)], 2), (0, [(0, 3), (0, 4)], 3)]
    assert [v[2] for v in visits(trace, start=1)] == [0, 1, 2, 3]


def test_next_uses():
    assert next_uses([(0, 1), (0, 2), (0, 1)]) == [2, 1 << 62, 1 << 62]


@pytest.mark.parametrize("seed", range(5))
def test_belady_never_worse_than_online_policies(seed):
    rng = random.Random(seed)
    layers, experts = 4, 8
    trace = []
    for _ in range(200):  # tokens: top-2 of a skewed distribution per layer
        for layer in range(layers):
            picks = set()
            while len(picks) < 2:
                picks.add(min(int(rng.expovariate(0.4)), experts - 1))
            trace += [(layer, e) for e in sorted(picks)]
    for slots in (2, 5, 9, 16, 32):
        opt = belady(trace, slots).misses
        for pol in ("lru", "lfu", "fate"):
            assert opt <= simulate(trace, slots, pol, layers=list(range(layers))), (slots, pol)
    assert belady(trace, layers * experts).misses == layers * experts  # compulsory only


def test_reuse_evicts_the_farthest_expected_next_use():
    pol = Reuse([0, 1, 2])
    for layer, uses in ((0, {0: 3, 1: 1}), (1, {0: 2, 1: 2}), (2, {0: 4})):
        pol.visit(layer, uses, 4)
    # standing at layer 2: layer 0 runs next (d=1), layer 1 after it (d=2); (0,1) is rarer than (0,0)
    assert pol.distance((0, 0)) < pol.distance((0, 1)) < pol.distance((2, 1))
    assert pol.victim([(0, 0), (0, 1), (1, 0)]) == (0, 1)  # 1 + 0.75 * 3 / 0.25 = 10 > 2 + 0.55 * 3 / 0.45
    assert pol.victim([(0, 0), (1, 0), (2, 1)]) == (2, 1)  # just used layer, never routed: farthest
    pol.hint((2, 1), 1.0)  # predicted for certain at its next visit: now only the cycle distance counts
    assert pol.distance((2, 1)) == pytest.approx(3.0)


def test_beyond_judges_a_prediction_by_its_uses_after_the_predicted_one():
    """A rare expert predicted for certain at the next layer is worth prefetching for that use alone, but not
    worth keeping after it: `beyond` (partial loads, which serve the predicted use with a cheaper read) says no,
    as its demand miss would. The base policy then counts it as a demand use, ignoring the prediction."""
    pol = Reuse([0, 1])
    for _ in range(20):
        pol.visit(0, {0: 1}, 1)
        pol.visit(1, {0: 1, 1: 1}, 1)
    # standing at layer 1: (0, 3) was never routed, (1, 1) is routed every token
    assert pol.admit((0, 3), (1, 1), prob=1.0)
    assert not pol.admit((0, 3), (1, 1), prob=1.0, beyond=True)
    assert pol.distance((0, 3), beyond=True) == pytest.approx(1 + 2 / pol.prob((0, 3)))
    base = LFU()
    base.access((0, 1))
    assert not base.admit((0, 2), (0, 1), prob=0.5) and not base.admit((0, 2), (0, 1), prob=0.5, beyond=True)
    base.uses[(0, 2)] = 0.5
    assert base.admit((0, 2), (0, 1), prob=0.6) and base.admit((0, 2), (0, 1), prob=0.4, beyond=True)
    assert not base.admit((0, 2), (0, 1), prob=0.4)


def test_profiled_popularity_ranks_experts_before_any_use():
    """With nothing observed yet, the reuse policy without a prior cannot tell experts of a layer apart (it falls
    back to recency); with the profiled popularity it keeps the popular one. Observations still move it."""
    keys = [(0, 0), (0, 1)]
    blind = Reuse([0, 1])
    blind.visit(1, {}, 1)
    assert blind.distance(keys[0]) == blind.distance(keys[1])
    pol = Reuse([0, 1], popularity={(0, 0): 0.1, (0, 1): 0.9})
    pol.visit(1, {}, 1)
    assert pol.victim(keys) == (0, 0)
    for _ in range(200):  # routing drifts to expert 0: the decayed counts outweigh the fixed prior
        pol.visit(0, {0: 1}, 1)
    pol.visit(1, {}, 1)
    assert pol.victim(keys) == (0, 1)
    lfu = LFU(popularity={(0, 0): 0.1, (0, 1): 0.9})
    assert lfu.victim(keys) == (0, 0)
    for _ in range(40):
        lfu.touch((0, 0))
    assert lfu.victim(keys) == (0, 1)


def test_cache_buffer_is_fixed():
    c = ExpertCache(4, 16, "cpu")
    assert c.buffer.shape == (4, 16) and c.buffer.dtype == torch.uint8


def routed(tokens: int, layers: int, experts: int, seed: int, block: int | None = None) -> list[dict[int, int]]:
    """Per token and layer, top-2 routing drawn from a skewed distribution; with `block`, the distribution's
    ranking is reshuffled every `block` tokens (routing that drifts)."""
    rng = random.Random(seed)
    ranks = [list(range(experts)) for _ in range(layers)]
    out = []
    for t in range(tokens):
        if block and t % block == 0:
            for r in ranks:
                rng.shuffle(r)
        for layer in range(layers):
            picks = set()
            while len(picks) < 2:
                picks.add(ranks[layer][min(int(rng.expovariate(0.5)), experts - 1)])
            out.append({e: 1 for e in picks})
    return out


def drive(policy, slots: int, routing: list[dict[int, int]], layers: int, bypass: bool) -> int:
    """The executor's protocol on an ExpertCache: visit, then resident experts first (pinned), then misses
    (cached, or under bypass streamed when the policy does not admit them). Returns the misses."""
    cache = ExpertCache(slots, 1, "cpu", policy)
    cache.policy.bypass = bypass
    misses = 0
    for i, uses in enumerate(routing):
        layer = i % layers
        cache.visit(layer, uses, 1)
        for key in sorted(((layer, e) for e in uses), key=lambda k: k not in cache):
            if cache.lookup(key) is not None:
                cache.pinned.add(key)
                continue
            misses += 1
            if bypass and not cache.admits(key):
                continue
            cache.allocate(key, 1)
            cache.pinned.add(key)
        cache.pinned.clear()
    return misses


@pytest.mark.parametrize("bypass", [False, True])
def test_a_ghost_replays_the_cache_under_its_estimate(bypass):
    """The adaptive reuse policy scores each half-life by a ghost cache: keys only, no data. A ghost must miss
    exactly where the real cache under that estimate alone misses, bypass or not."""
    from moepack.runtime.policies import Ghost, ReuseEstimate

    layers, slots = 3, 7
    routing = routed(150, layers, 8, seed=1, block=20)
    real = drive(Reuse(list(range(layers)), half_life=8.0), slots, routing, layers, bypass)
    ghost = Ghost(ReuseEstimate(list(range(layers)), 8.0), slots)
    for i, uses in enumerate(routing):
        layer = i % layers
        ghost.estimate.visit(layer, uses, 1)
        ghost.order.visited(layer)
        busy = [(layer, e) for e in uses]
        for key in sorted(busy, key=lambda k: k not in ghost.order.entry):  # the order drive() uses
            ghost.access(key, set(busy), bypass)
    assert ghost.misses == real


def test_reuse_follows_the_memory_that_fits_the_routing():
    """Stationary routing rewards a long memory, routing that reshuffles every few tokens a short one; the
    policy with several half-lives ends up following the one its ghosts found best, and misses about as little
    as the best fixed half-life, whichever it is."""
    layers, experts, slots = 4, 8, 12
    for block, want in ((None, 64.0), (6, 8.0)):
        routing = routed(600, layers, experts, seed=2, block=block)
        fixed = {h: drive(Reuse(list(range(layers)), half_life=h), slots, routing, layers, True)
                 for h in (8.0, 16.0, 32.0, 64.0)}
        pol = Reuse(list(range(layers)), half_life=(8.0, 16.0, 32.0, 64.0), slots=slots)
        adaptive = drive(pol, slots, routing, layers, True)
        assert min(fixed, key=fixed.get) == want, fixed
        assert pol.estimate.half_life == want
        assert adaptive <= 1.05 * min(fixed.values()), (adaptive, fixed)
    with pytest.raises(ValueError, match="slot count"):
        Reuse([0, 1], half_life=(8.0, 32.0))
