"""Throughput mode: batched greedy outputs equal single runs; each expert loaded at most once per layer step."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.runtime.api import MoePackModel
from moepack.runtime.routing_trace import RoutingTrace
from moepack.runtime.throughput import ThroughputEngine, generate_many, load_for_throughput

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
            cache[family] = [pm.generate(p, max_new_tokens=NEW).tokens for p in prompts()]
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("batches,slots,stack_dense", [(3, 4, True), (8, 9, True), (4, 4, False)])
def test_batched_equals_single_runs(packs, reference, family, batches, slots, stack_dense):
    pm = load_for_throughput(packs(family), vram=None, batches=batches, slots=slots, context=64)
    res = generate_many(pm, prompts(), batches=batches, max_new_tokens=NEW, stack_dense=stack_dense)
    assert [r.tokens for r in res.results] == reference(family)
    assert res.stats.generated_tokens == len(LENGTHS) * NEW
    assert res.stats.duplicate_loads == 0


@pytest.mark.parametrize("policy", ["reuse", "fate", "lfu"])
def test_every_cache_policy_serves_throughput_mode(packs, reference, policy):
    """The engine's cache gets the model's layers, so the policies that need them work here too."""
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=3, slots=4, context=64, cache_policy=policy)
    assert pm.executor.cache.policy.name == policy
    res = generate_many(pm, prompts(), batches=3, max_new_tokens=NEW)
    assert [r.tokens for r in res.results] == reference("mixtral")


def test_batch_size_puts_batches_times_size_in_flight(packs, reference):
    """2 batches of 2 sequences: four sequences advance per step (the fifth waits), outputs unchanged."""
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=2, batch_size=2, slots=4, context=64)
    steps = []
    with ThroughputEngine(pm, batches=2, batch_size=2) as engine:
        real = engine._step

        def counting(seqs, feeds):
            steps.append(len(seqs))
            return real(seqs, feeds)

        engine._step = counting
        res = engine.generate(prompts(), max_new_tokens=NEW)
    assert [r.tokens for r in res.results] == reference("mixtral")
    assert max(steps) == 4 and res.stats.batch_size == 2
    assert steps[0] == 2  # one batch's worth of prefill chunks per step


def test_hot_experts_and_no_prefetch_keep_outputs(packs, reference):
    pm = load_for_throughput(packs("mixtral"), vram=None, batches=4, slots=6, context=64)
    hot = [(0, 0), (1, 3), (2, 5)]
    res = generate_many(pm, prompts(), batches=4, max_new_tokens=NEW, hot=hot, prefetch=False)
    assert [r.tokens for r in res.results] == reference("mixtral")
    assert res.stats.hot_experts == 3 and res.stats.prefetch_issued == 0
    assert not pm.executor.cache.pinned  # every pin released when the engine closes


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
    with ThroughputEngine(pm, batches=5, record=trace) as engine:
        res = engine.generate(prompts(), max_new_tokens=NEW)
        log = list(engine.executor.load_log)
    assert len(loads) == len(log) == res.stats.loads
    per_step: dict[tuple[int, tuple[int, int]], int] = {}
    for step, key in log:
        per_step[(step, key)] = per_step.get((step, key), 0) + 1
    assert max(per_step.values()) == 1
    # with 3 slots each layer step loads at most the experts its stacked tokens route to
    for layer in trace.layers:
        assert trace.co[layer].diagonal().sum() >= sum(1 for _, k in log if k[0] == layer) - res.stats.prefetch_issued
    # one at a time moves more: every sequence reloads the experts it shares with the others
    single = load_for_throughput(packs("mixtral"), vram=None, batches=1, slots=3, context=64)
    one = generate_many(single, prompts(), batches=1, max_new_tokens=NEW)
    assert res.stats.loads < one.stats.loads


def test_cli_run_prompts_json(packs, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Now is the winter\n\nof our discontent made glorious\nsummer\n")
    res = CliRunner().invoke(app, ["run", str(packs("mixtral")), "--prompts", str(f), "--batches", "2", "-n", "4",
                                   "--vram", "64MB", "--context", "64", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert len(data["results"]) == 3 and data["batches"] == 2 and data["batch_size"] == 1
    for field in ("tokens_per_s", "stall_fraction", "loads", "latencies_s", "duplicate_loads"):
        assert field in data, field
    assert data["duplicate_loads"] == 0
