"""Prefetch, cache policies, big-little and FloE sparsity on a real (baby) pack: which ones keep the numbers
exact, which change the compute as intended, and the run statistics they report."""

from __future__ import annotations

import pytest
import torch

from moepack.compress import compress
from moepack.runtime.api import MoePackModel
from moepack.runtime.belady import belady

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate"


@pytest.fixture(scope="module")
def pack(baby, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "mixtral-q4.moepack"
    return compress(str(baby("mixtral")), out, recipe="q4g32").path


@pytest.fixture(scope="module")
def exact(pack):
    free = MoePackModel.load(pack, device="cpu")
    ids = free.encode(PROMPT)
    return ids, free.logits(ids), free.generate(ids, max_new_tokens=6, stop_at_eos=False).tokens


def budgeted(pack, slots: int, **kw) -> MoePackModel:
    probe = MoePackModel.load(pack, device="cpu", vram="1TB", context=128)
    model = MoePackModel.load(pack, device="cpu", vram=probe.budget.vram_for(slots), context=128, **kw)
    assert model.budget.slots == slots
    return model


def watch_slots(model) -> list[int]:
    cache, seen = model.executor.cache, []
    real = cache.allocate

    def allocate(key, nbytes, **kw):
        out = real(key, nbytes, **kw)
        seen.append(len(cache))
        return out

    cache.allocate = allocate
    return seen


@pytest.mark.parametrize("kw", [dict(prefetch="fate", prefetch_min_prob=0.0, cache_policy="lru", bypass=False),
                                dict(prefetch="fate", cache_policy="fate", prefetch_min_prob=0.0),
                                dict(prefetch="fate", cache_policy="reuse", prefetch_min_prob=0.0),
                                dict(cache_policy="lfu"), dict(cache_policy="fate"), dict(cache_policy="reuse"),
                                dict(adaptive_k="off", sparse_channels="off"),
                                dict(bypass=True), dict(bypass=True, cache_policy="reuse"),
                                dict(bypass=True, cache_policy="reuse", prefetch="fate", prefetch_min_prob=0.0)])
@pytest.mark.parametrize("slots", [3, 8])
def test_prefetch_and_policies_never_change_the_numbers(pack, exact, kw, slots):
    ids, want, want_tokens = exact
    model = budgeted(pack, slots, **kw)
    seen = watch_slots(model)
    assert torch.equal(model.logits(ids), want)
    gen = model.generate(ids, max_new_tokens=6, stop_at_eos=False)
    assert gen.tokens == want_tokens
    assert max(seen) <= slots and len(model.executor.cache) <= slots
    s = gen.stats
    if kw.get("prefetch") == "fate":
        assert 0 <= s.prefetch_precision <= 1 and 0 <= s.prefetch_recall <= 1
        assert s.to_json()["prefetch_precision"] == s.prefetch_precision
        if kw.get("cache_policy") == "lru":  # LRU admits every prediction into a free or unpinned slot
            assert s.prefetch_bytes > 0
        else:  # other policies may refuse a prediction worth less than what it would evict
            assert s.prefetch_bytes > 0 or model.executor.counts["prefetch_not_admitted"] > 0


def test_gated_prefetch_loads_only_likely_predictions(pack, exact):
    """A probability floor above 1 turns every prediction into a hint: nothing is prefetched, and the
    predictions are still scored."""
    ids, _, want_tokens = exact
    model = budgeted(pack, 8, prefetch="fate")
    model.executor.prefetch_min_prob = 1.01  # above any measured hit rate (the option itself takes [0, 1])
    gen = model.generate(ids, max_new_tokens=6, stop_at_eos=False)
    assert gen.tokens == want_tokens
    assert gen.stats.prefetch_bytes == 0 and model.executor.counts["prefetch_unlikely"] > 0
    assert gen.stats.prefetch_precision is not None


def test_stats_include_the_belady_bound_and_it_bounds_lru(pack, exact):
    ids, _, _ = exact
    model = budgeted(pack, 4, cache_policy="lru", bypass=False)  # MIN bounds every policy that caches each miss
    gen = model.generate(ids, max_new_tokens=8, stop_at_eos=False)
    s = gen.stats
    assert s.belady_bytes_per_token is not None
    assert s.belady_bytes_per_token <= s.bytes_moved_per_token
    assert s.belady_hit_rate >= s.cache_hit_rate
    trace = model.executor.trace
    assert len(trace) == s.expert_calls == s.cache_hits + s.cache_misses
    assert belady(trace, 4).misses <= s.cache_misses
    data = s.to_json()
    for key in ("belady_bytes_per_token", "belady_hit_rate", "prefetch_precision", "expert_calls"):
        assert key in data


def test_big_little_runs_fewer_experts(pack, exact):
    ids, want, _ = exact
    plain = MoePackModel.load(pack, device="cpu")
    plain.logits(ids)
    calls = plain.executor.expert_calls
    little = MoePackModel.load(pack, device="cpu", adaptive_k=0.05)  # top-1 always carries >= 5%: all little
    got = little.logits(ids)
    assert little.executor.counts["little_tokens"] == little.executor.counts["tokens"]
    assert little.executor.expert_calls < calls
    assert not torch.equal(got, want)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9
    never = MoePackModel.load(pack, device="cpu", adaptive_k=1.0)  # share never reaches 1: nothing dropped
    assert torch.equal(never.logits(ids), want)


def test_big_little_falls_back_when_a_big_expert_is_missing(pack, exact):
    ids, want, _ = exact
    model = budgeted(pack, 3, adaptive_k=1.0, fallback=True)  # nobody is little by the signal; only fallbacks
    model.logits(ids[:1])
    gen = model.generate(ids, max_new_tokens=6, stop_at_eos=False)
    assert model.executor.counts["fallback_tokens"] > 0
    assert gen.stats.extra["fallback_token_share"] > 0
    strict = budgeted(pack, 3, adaptive_k=1.0, fallback=False)
    assert torch.equal(strict.logits(ids), want)


def test_fallback_threshold_limits_which_tokens_fall_back(pack, exact, monkeypatch):
    """Only tokens whose little share reaches the fallback threshold drop a missing big expert."""
    from moepack.runtime import executor as ex_mod

    ids, _, _ = exact
    seen = []
    real = ex_mod.StreamingExecutor._fallback

    def spy(self, layer, topk_ids, active, share):
        before = active.clone()
        out = real(self, layer, topk_ids, active.clone(), share)
        dropped = (before & ~out).any(1)
        seen.extend(share[dropped].tolist())
        return out

    monkeypatch.setattr(ex_mod.StreamingExecutor, "_fallback", spy)
    counts = []
    for threshold in (True, 0.75, 1.0):  # True: every token may fall back
        model = budgeted(pack, 3, adaptive_k=1.0, fallback=threshold)
        seen.clear()
        model.generate(ids, max_new_tokens=8, stop_at_eos=False)  # decode: one token at a time
        counts.append(model.executor.counts["fallback_tokens"])
        if threshold is not True:
            assert all(v >= threshold for v in seen)
    assert counts[0] > counts[1] and counts[2] == 0


def test_sparse_channels_compute_fewer_rows(pack, exact):
    ids, want, _ = exact
    model = MoePackModel.load(pack, device="cpu", sparse_channels=0.5)
    model.generate(ids[:4], max_new_tokens=4, stop_at_eos=False)
    counts = model.executor.counts
    assert counts["rows_kept"] < counts["rows_total"]
    got = model.logits(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9
    one = MoePackModel.load(pack, device="cpu", sparse_channels=1.0)
    assert (one.logits(ids) - want).abs().max().item() < 1e-4  # all channels: only summation order differs


def test_partial_loads_move_fewer_bytes_with_the_same_numbers(pack, exact):
    ids, _, _ = exact
    whole = budgeted(pack, 3, sparse_channels=0.5)
    part = budgeted(pack, 3, sparse_channels=0.5, partial_loads=True)
    a = whole.logits(ids)
    b = part.logits(ids)
    assert (a - b).abs().max().item() < 1e-4
    g = part.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert g.stats.extra["partial_bytes_saved"] > 0 and g.stats.extra["partial_loads"] > 0
    c = part.executor.counts
    assert 1 <= g.stats.extra["partial_runs_per_load"] == c["partial_runs"] / c["partial_loads"]
    assert c["partial_runs"] <= c["partial_rows"]  # a run is at least one row
    per_miss = g.stats.bytes_moved / g.stats.cache_misses
    assert per_miss < max(e.nbytes for e in part.pack.manifest.experts)


def test_bypass_streams_misses_the_policy_would_not_keep(pack, exact):
    """Under bypass a miss the policy does not admit is computed from the pack without a slot: the numbers stay
    exact, every miss still moves the whole expert, and only admitted misses enter the cache."""
    ids, want, want_tokens = exact
    model = budgeted(pack, 4, cache_policy="lru", bypass=True)  # admitting by decayed use counts (TinyLFU-style)
    cache = model.executor.cache
    assert cache.policy.bypass
    assert torch.equal(model.logits(ids), want)
    loads = watch_slots(model)
    gen = model.generate(ids, max_new_tokens=6, stop_at_eos=False)
    assert gen.tokens == want_tokens
    s, nbytes = gen.stats, model.pack.manifest.experts[0].nbytes
    assert s.extra["streamed"] > 0 and len(loads) > 0  # some misses were cached, some streamed through
    assert s.cache_misses == len(loads) + s.extra["streamed"]  # each miss either took a slot or streamed
    assert s.bytes_moved == s.cache_misses * nbytes  # no prefetch: every miss moved its expert once
    assert max(loads) <= 4
    plain = budgeted(pack, 4, cache_policy="lru", bypass=False)
    assert "streamed" not in plain.generate(ids, max_new_tokens=6, stop_at_eos=False).stats.extra


@pytest.mark.parametrize("partial, bypass", [(False, False), (True, False), (False, True)])
def test_prefetch_under_bypass_asks_whether_the_expert_is_worth_keeping(pack, exact, partial, bypass):
    """Under partial loads a predicted expert's demand miss would read only its kept rows, and under bypass it
    would stream through without evicting anything, so a prefetch is admitted only if the policy would keep the
    expert after that use (`beyond`); with neither, the prediction is judged by that use."""
    ids, _, _ = exact
    model = budgeted(pack, 3, prefetch="fate", prefetch_min_prob=0.0, cache_policy="reuse", sparse_channels=0.5,
                     partial_loads=partial, bypass=bypass)
    asked, real = [], model.executor.cache.policy.admit

    def admit(incoming, victim, prob=None, beyond=False):
        if prob is not None:
            asked.append(beyond)
        return real(incoming, victim, prob, beyond)

    model.executor.cache.policy.admit = admit
    model.generate(ids, max_new_tokens=6, stop_at_eos=False)
    assert asked and set(asked) == {partial or bypass}


@pytest.fixture(scope="module")
def calibrated(baby, tmp_path_factory):
    """The same pack compressed with calibration: its meta carries what `auto` reads."""
    from moepack.profile import default_calibration_text

    d = tmp_path_factory.mktemp("rt-cal")
    (d / "calib.txt").write_text(default_calibration_text())
    return compress(str(baby("mixtral")), d / "cal.moepack", recipe="q4g32", calib=d / "calib.txt").path


def test_auto_settings_come_from_the_profiled_statistics(calibrated, exact):
    from moepack.runtime.adaptive import BIG_LITTLE_ERROR, FALLBACK_ERROR, SPARSE_ERROR, AdaptiveCalibration

    ids, want, _ = exact
    model = budgeted(calibrated, 3, adaptive_k="auto", fallback="auto", sparse_channels="auto", partial_loads=True)
    cal = AdaptiveCalibration.from_pack(model.pack)
    ex = model.executor
    layers = list(model.spec.sparse_layer_ids)
    assert sorted(ex.big_little) == sorted(ex.fallback) == layers
    assert len(ex.sparse_keep) == len(model.pack.manifest.experts)
    weights = cal.sparse_weight
    assert sorted(weights) == sorted(ex.sparse_keep) and min(weights.values()) >= 0 < max(weights.values())
    mean, target = sum(weights.values()) / len(weights), cal.scale * SPARSE_ERROR
    for key, keep in ex.sparse_keep.items():  # one price on absolute error: keep + (s / mean s) rel / target least
        cost = {1.0: 1.0, **{k: k + weights[key] / (mean * target) * e
                             for k, e in zip(cal.keep_grid, cal.sparse_error[key], strict=True)}}
        assert cost[keep] == pytest.approx(min(cost.values()))
    assert cal.scale > 0  # tuned at compress time: the baby model absorbs some error
    for layer in layers:  # c (1 - threshold)^2 = target, inside [0, 1]
        c = cal.drop_error[layer]
        for thr, target in ((ex.big_little[layer], cal.scale * BIG_LITTLE_ERROR),
                            (ex.fallback[layer], cal.scale * FALLBACK_ERROR)):
            assert thr in (0.0, 1.0) or c * (1 - thr) ** 2 == pytest.approx(target)
        assert ex.fallback[layer] <= ex.big_little[layer]  # a fallback may cost more per token
    got = model.logits(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9


def test_auto_needs_a_calibrated_pack_and_a_sane_one(pack, calibrated, tmp_path):
    import json
    import shutil

    from moepack.errors import ManifestError, MoepackError

    with pytest.raises(MoepackError, match="compressed with calibration"):
        MoePackModel.load(pack, device="cpu", sparse_channels="auto")
    bad = tmp_path / "bad.moepack"
    shutil.copytree(calibrated, bad)
    manifest = bad / "manifest.json"
    data = json.loads(manifest.read_text())
    data["meta"]["adaptive"]["drop_error"] = [[0, "many"]]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="meta.adaptive"):
        MoePackModel.load(bad, device="cpu", adaptive_k="auto")


def test_reuse_and_lfu_start_from_the_profiled_frequencies(calibrated, pack):
    """compress profiles routing frequencies; with cache_prior lfu and reuse take them as their prior."""
    from moepack.runtime.routing_trace import profiled_popularity

    assert profiled_popularity(budgeted(pack, 3).pack) is None  # compressed without calibration
    model = budgeted(calibrated, 3, cache_policy="reuse", cache_prior=True)
    pop = profiled_popularity(model.pack)
    spec = model.spec
    for layer in spec.sparse_layer_ids:
        assert sum(pop[(layer, e)] for e in range(spec.num_experts)) == pytest.approx(spec.top_k)
    estimates = model.executor.cache.policy.estimates  # one per half-life, each with the prior
    assert len(estimates) > 1 and all(e.popularity == pop and e.prior_tokens == 32.0 for e in estimates)
    assert budgeted(calibrated, 3, cache_policy="lfu", cache_prior=True).executor.cache.policy.count == pytest.approx(
        {k: 32.0 * p for k, p in pop.items()})
    blind = budgeted(calibrated, 3, cache_policy="reuse").executor.cache.policy  # off by default
    assert all(e.popularity == {} and e.prior_tokens == 0 for e in blind.estimates)


def test_forced_decode_serves_a_fixed_text_with_the_same_statistics(pack, exact):
    """generate(forced=...) decodes given tokens through the same path: on the greedy text it reproduces the
    free run's tokens, bytes and Belady bound; an approximation then changes the bytes, not the workload."""
    ids, _, want_tokens = exact
    free = budgeted(pack, 3).generate(ids, max_new_tokens=6, stop_at_eos=False)
    forced = budgeted(pack, 3).generate(ids, forced=free.tokens, stop_at_eos=False)
    assert forced.tokens == free.tokens == want_tokens
    assert forced.stats.bytes_moved == free.stats.bytes_moved
    assert forced.stats.belady_bytes_decode == free.stats.belady_bytes_decode
    model = budgeted(pack, 3)
    other = [(t + 1) % model.spec.vocab_size for t in want_tokens]
    assert model.generate(ids, forced=other, stop_at_eos=False).tokens == other
    little = budgeted(pack, 3, adaptive_k=0.5).generate(ids, forced=free.tokens, stop_at_eos=False)
    assert little.tokens == free.tokens and little.stats.expert_calls < free.stats.expert_calls
