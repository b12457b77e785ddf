"""One engine for one and many sequences: batched greedy outputs equal single runs, every run option means
the same with one prompt and with several, each expert is loaded at most once per layer step, and the
step-wise API (add, step, cancel, collect) serves sequences that join and leave mid-run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.kernels import Backend
from moepack.runtime.api import MoePackModel
from moepack.runtime.routing_trace import RoutingTrace
from moepack.runtime.throughput import generate_many, load_for_throughput

LENGTHS = (3, 17, 6, 29, 1)
NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packs(baby, tmp_path_factory):
    from moepack.compress import compress

    made = {}

    def get(family: str):
        if family not in made:
            out = tmp_path_factory.mktemp(f"tp-{family}") / "p.moepack"
            compress(str(baby(family)), out, recipe="q4g32")
            made[family] = out
        return made[family]

    return get


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(packs):
    """Greedy tokens of every prompt run alone through MoePackModel.generate."""
    cache = {}

    def get(family: str):
        if family not in cache:
            pm = MoePackModel.load(packs(family), context=64)
            cache[family] = [pm.generate(p, max_new_tokens=NEW, stop_at_eos=False).tokens for p in prompts()]
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("batches,slots", [(3, 4), (8, 9)])
def test_batched_equals_single_runs(packs, reference, family, batches, slots):
    pm = load_for_throughput(packs(family), vram=None, batches=batches, slots=slots, context=64)
    res = generate_many(pm, prompts(), batches=batches, max_new_tokens=NEW, stop_at_eos=False)
    assert [r.tokens for r in res.results] == reference(family)
    assert res.stats.generated_tokens == len(LENGTHS) * NEW
    assert res.stats.duplicate_loads == 0
    assert res.stats.host_overhead_s_per_layer is not None and res.stats.host_overhead_s_per_layer > 0


# every run option, with one prompt and with several: the same engine, so the same tokens (options whose
# result depends on what is resident, like big-little fallback, are checked for running in both modes)
OPTIONS = [dict(cache_policy="lru"), dict(cache_policy="lfu"), dict(cache_policy="fate"),
           dict(cache_policy="reuse", bypass=False), dict(cache_prior=False, bypass=True),
           dict(prefetch="fate", prefetch_min_prob=0.0), dict(prefetch="fate", prefetch_width=4),
           dict(adaptive_k=0.6, fallback="off"), dict(sparse_channels=0.5),
           dict(sparse_channels=0.5, partial_loads=True), dict(backend="torch"), dict(verify=False)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_means_the_same_for_one_and_many_prompts(packs, options):
    path = packs("mixtral")
    one = load_for_throughput(path, vram=None, batches=1, slots=4, context=64, **options)
    single = [one.generate(p, max_new_tokens=NEW, stop_at_eos=False) for p in prompts()]
    many = load_for_throughput(path, vram=None, batches=3, slots=4, context=64, **options)
    res = generate_many(many, prompts(), batches=3, max_new_tokens=NEW, stop_at_eos=False)
    assert [r.tokens for r in res.results] == [g.tokens for g in single]
    for key, value in options.items():  # the option reached the executor in both modes
        if key == "cache_policy":
            assert one.executor.cache.policy.name == many.executor.cache.policy.name == value
        if key == "sparse_channels":
            assert one.executor.sparse_keep == many.executor.sparse_keep == value
            assert single[0].stats.extra["channels_computed"] < 1.0
        if key == "adaptive_k":
            assert one.executor.big_little == many.executor.big_little == value
            assert "little_token_share" in single[0].stats.extra
        if key == "prefetch":
            assert single[-1].stats.prefetch_precision is not None
            assert many.executor.stats.counts["prefetch_issued"] + many.executor.stats.counts["prefetch_unlikely"] > 0


def test_fallback_runs_in_both_modes(packs):
    path = packs("mixtral")
    for batches in (1, 3):
        pm = load_for_throughput(path, vram=None, batches=batches, slots=3, context=64, adaptive_k=1.0, fallback=0.0)
        res = generate_many(pm, prompts(), batches=batches, max_new_tokens=NEW, stop_at_eos=False)
        assert pm.executor.stats.counts["fallback_tokens"] > 0
        assert res.stats.generated_tokens == len(LENGTHS) * NEW


def test_batch_size_puts_batches_times_size_in_flight(packs, reference):
    """2 batches of 2 sequences: four sequences advance per step (the fifth waits), outputs unchanged."""
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=2, batch_size=2, slots=4, context=64)
    steps = []
    real = pm.model.forward_many

    def counting(feeds, caches):
        steps.append(len(feeds))
        return real(feeds, caches)

    pm.model.forward_many = counting
    res = generate_many(pm, prompts(), batches=2, batch_size=2, max_new_tokens=NEW, stop_at_eos=False)
    assert [r.tokens for r in res.results] == reference("mixtral")
    assert max(steps) == 4 and res.stats.batch_size == 2
    assert steps[0] == 2  # one batch's worth of prefill chunks per step


def test_hot_experts_and_no_prefetch_keep_outputs(packs, reference):
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=4, slots=6, context=64)
    hot = [(0, 0), (1, 3), (2, 5)]
    res = generate_many(pm, prompts(), batches=4, max_new_tokens=NEW, hot=hot, prefetch=False, stop_at_eos=False)
    assert [r.tokens for r in res.results] == reference("mixtral")
    assert res.stats.hot_experts == 3 and res.stats.prefetch_issued == 0
    assert not pm.executor.cache.pinned  # every pin released when the run ends


def test_each_expert_loaded_at_most_once_per_layer_step(packs):
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=5, slots=3, context=64)
    streamer = pm.executor.streamer
    loads: list[tuple[int, int]] = []
    real = streamer.load

    def counting(key, dst):
        loads.append(key)
        return real(key, dst)

    streamer.load = counting
    trace = RoutingTrace.for_spec(pm.spec)
    res = generate_many(pm, prompts(), batches=5, max_new_tokens=NEW, record=trace)
    assert len(loads) == res.stats.loads and res.stats.duplicate_loads == 0
    assert res.stats.loads <= sum(int(trace.co[layer].diagonal().sum()) for layer in trace.layers)
    # one at a time moves more: every sequence reloads the experts it shares with the others
    single = load_for_throughput(packs("mixtral"), vram=None, batches=1, slots=3, context=64)
    one = generate_many(single, prompts(), batches=1, max_new_tokens=NEW)
    assert res.stats.loads < one.stats.loads


def test_step_api_serves_sequences_that_join_and_leave(packs, reference):
    """Continuous batching: a sequence added mid-run, one cancelled; the others' tokens are unchanged."""
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=4, slots=4, context=64)
    ps, want = prompts(), reference("mixtral")
    engine = pm.engine(max_in_flight=4)
    first = engine.add(ps[0], max_new_tokens=NEW, stop_at_eos=False)
    doomed = engine.add(ps[1], max_new_tokens=NEW, stop_at_eos=False)
    emitted = engine.step() + engine.step()
    late = engine.add(ps[2], max_new_tokens=NEW, stop_at_eos=False)
    engine.cancel(doomed)
    while not engine.idle:
        emitted += engine.step()
    done = engine.collect()
    engine.close()
    assert {s.id for s in done} == {first.id, doomed.id, late.id}
    assert first.tokens == want[0] and late.tokens == want[2]
    assert doomed.cancelled and len(doomed.tokens) < NEW and doomed.cache is None
    assert [t for s, t in emitted if s is first] == want[0]
    assert engine.stats.decode_tokens > 0 and engine.stats.steps >= NEW


def test_single_prompt_is_a_batch_of_one(packs, reference):
    """generate() and a one-sequence engine run give the same tokens and the same kind of statistics."""
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=1, slots=4, context=64)
    gen = pm.generate(prompts()[3], max_new_tokens=NEW, stop_at_eos=False)
    assert gen.tokens == reference("mixtral")[3]
    data = gen.stats.to_json()
    for field in ("ttft_s", "decode_tokens_per_s", "cache_hit_rate", "bytes_moved_per_token", "peak_rss_bytes",
                  "host_overhead_s_per_layer", "prefetch_precision"):
        assert field in data, field
    assert data["host_overhead_s_per_layer"] > 0 and data["cache_hits"] + data["cache_misses"] > 0


def test_hot_path_holds_no_lookups(packs, monkeypatch):
    """An expert's views are built once per load into its slot, and no product resolves its kernel backend."""
    import moepack.kernels.ops as ops

    pm = load_for_throughput(packs("mixtral"), vram=None, batches=1, slots=24, context=64)  # every expert fits
    built, real = [], pm.executor._projections
    monkeypatch.setattr(pm.executor, "_projections", lambda key, blob: built.append(key) or real(key, blob))
    pm.generate(prompts()[3], max_new_tokens=2, stop_at_eos=False)  # warm: loads and binds
    resolved = []
    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **k: resolved.append(a) or Backend.TORCH)
    for p in prompts():
        pm.generate(p, max_new_tokens=NEW, stop_at_eos=False)
    assert built and len(built) == len(set(built)) == pm.executor.streamer.loads
    assert not resolved


def test_cli_run_prompts_json(packs, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Now is the winter\n\nof our discontent made glorious\nsummer\n")
    res = CliRunner().invoke(app, ["run", str(packs("mixtral")), "--prompts", str(f), "--batches", "2", "-n", "4",
                                   "--vram", "64MB", "--context", "64", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert len(data["results"]) == 3 and data["batches"] == 2 and data["batch_size"] == 1
    for field in ("tokens_per_s", "stall_fraction", "loads", "latencies_s", "duplicate_loads",
                  "host_overhead_s_per_layer"):
        assert field in data, field
    assert data["duplicate_loads"] == 0
