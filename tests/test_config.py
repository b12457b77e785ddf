"""RunConfig / SamplingParams: every bad value refused up front (before a pack is opened), options that need
another refused alone, and the one budget function shared by `run` and `plan`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.errors import BudgetError, ConfigError
from moepack.runtime.budget import MemoryNeeds, plan_budget, slots_left
from moepack.runtime.config import RunConfig, SamplingParams

MISSING = "/nonexistent/never.moepack"  # an option error must come before the pack is looked for


@pytest.mark.parametrize("args, flag", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0", "--temperature", "0.8"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--context", "0"], "--context"),
    (["--vram", "-1GB"], "--vram"),
    (["--vram", "0"], "--vram"),
    (["--vram", "eleven"], "--vram"),
    (["--threads", "0"], "--threads"),
    (["--cache-policy", "mru"], "--cache-policy"),
    (["--prefetch", "psychic"], "--prefetch"),
    (["--adaptive-k", "1.5"], "--adaptive-k"),
    (["--sparse-channels", "0"], "--sparse-channels"),
    (["--fallback", "0.5"], "--fallback"),  # needs --adaptive-k
    (["--partial-loads"], "--partial-loads"),  # needs --sparse-channels
    (["--prefetch-min-prob", "0.5"], "--prefetch-min-prob"),  # needs --prefetch fate
    (["--cache-policy", "lru", "--cache-prior"], "--cache-prior"),
    (["--batches", "2"], "--batches"),  # needs --prompts
    (["--dtype", "int8"], "--dtype"),
])
def test_run_refuses_bad_values_before_opening_the_pack(args, flag):
    res = CliRunner().invoke(app, ["run", MISSING, "--prompt", "hi", *args])
    assert res.exit_code == 2, res.output
    assert flag in res.output and "never.moepack" not in res.output
    assert "Traceback" not in res.output


def test_run_refuses_undecodable_prompts(tmp_path):
    res = CliRunner().invoke(app, ["run", MISSING, "--prompt", "caf\udce9"])
    assert res.exit_code == 2 and "UTF-8" in res.output
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"hello\n\xff\xfe world\n")
    res = CliRunner().invoke(app, ["run", MISSING, "--prompts", str(bad)])
    assert res.exit_code == 2 and "not UTF-8" in res.output and "prompts.txt" in res.output
    res = CliRunner().invoke(app, ["run", MISSING])
    assert res.exit_code == 2 and "--prompt" in res.output


def test_config_normalises_and_describes():
    c = RunConfig.build(vram="11GiB", dtype="bf16", prefetch="off", adaptive_k="auto", fallback="off",
                        sparse_channels="0.5", partial_loads=True)
    assert c.vram == 11 << 30 and c.dtype == "bfloat16" and c.prefetch == "none"
    assert c.adaptive_k == "auto" and c.fallback_share is None and c.sparse_channels == 0.5
    assert RunConfig.build(adaptive_k=0.9).fallback_share == 0.7  # the default threshold
    assert RunConfig.build(adaptive_k=0.9, fallback=True).fallback_share == 0.0  # every token may
    assert c.streams_misses and not RunConfig.build(bypass=False).streams_misses
    assert json.loads(json.dumps(c.to_json()))["vram"] == 11 << 30
    labels = [label for label, _ in c.describe()]
    assert "cache policy" in labels and "sparse channels (FloE)" in labels
    assert RunConfig.build(**c.to_json()) == c  # what --json prints builds the same config
    with pytest.raises(ConfigError, match="unknown run option"):
        RunConfig.build(vrma="1GB")
    assert RunConfig().context_for(512) == 512 and RunConfig().context_for(None) == 2048
    assert RunConfig.build(context=4096).context_for(512) == 4096


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(max_new_tokens=1.5), dict(temperature=-1),
                                dict(temperature=math.nan), dict(top_p=0.0), dict(top_p=1.01), dict(seed=-3)])
def test_sampling_params_refuse(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)


NEEDS = MemoryNeeds(dense_bytes=10_000, kv_bytes_per_token=10, workspace_bytes=1_000, transit_bytes=0,
                    slot_bytes=1_000, total_experts=32, min_slots=2)


def test_budget_split_and_minimum():
    plan = plan_budget(10_000 + 1_000 + 100 * 10 * 2 + 5 * 1_000, NEEDS, context=100, sequences=2)
    assert plan.slots == 5 and plan.kv_bytes == 2_000 and plan.vram_for(5) == plan.budget
    assert slots_left(None, NEEDS, context=100) == 32
    with pytest.raises(BudgetError, match="at least"):
        plan_budget(12_000, NEEDS, context=100)
    cuda = MemoryNeeds(**{**NEEDS.__dict__, "transit_bytes": 1_000})  # a transit slot costs one expert slot
    assert slots_left(30_000, cuda, context=100) == slots_left(30_000, NEEDS, context=100) - 1 == 17


def test_plan_and_run_share_the_budget(baby, tmp_path):
    """plan's slots for n sequences are what `run` allocates for them, on the CPU and, by the same
    arithmetic, on CUDA with its transit buffer (MemoryNeeds.of reads only the manifest)."""
    from moepack.compress import compress
    from moepack.format import Pack
    from moepack.runtime.api import MoePackModel
    from moepack.runtime.planner import ModelShape, slots_for

    out = tmp_path / "p.moepack"
    compress(str(baby("mixtral")), out, recipe="q4g32")
    with Pack(out) as pack:
        shape = ModelShape.from_pack(pack)
        cpu = MemoryNeeds.of(pack, device=torch.device("cpu"), dtype=torch.float32)
        gpu = MemoryNeeds.of(pack, device=torch.device("cuda"), dtype=torch.bfloat16, streams_misses=True)
        gpu_shape = ModelShape.from_pack(pack, dtype=torch.bfloat16, device="cuda")
    assert gpu.transit_bytes == gpu.slot_bytes and cpu.transit_bytes == 0 and gpu_shape.needs == gpu
    vram = cpu.fixed_bytes(64, 4) + 7 * cpu.slot_bytes
    assert slots_for(shape, vram, 2, 64, batch_size=2) == 7
    assert slots_for(gpu_shape, vram, 2, 64, batch_size=2) == slots_left(vram, gpu, context=64, sequences=4)
    run = MoePackModel.load(out, device="cpu", vram=vram, context=64, batches=2, batch_size=2)
    assert run.budget.slots == 7 and run.executor.cache.slots == 7
    one = MoePackModel.load(out, device="cpu", vram=vram, context=64)
    assert one.budget.slots == slots_for(shape, vram, 1, 64) == min(shape.total_experts, 7 + 3 * 64 *
                                                                   cpu.kv_bytes_per_token // cpu.slot_bytes)


def test_context_past_the_model_is_warned_and_memory_checked(baby, tmp_path, capsys):
    from moepack.compress import compress
    from moepack.runtime.api import MoePackModel

    out = tmp_path / "p.moepack"
    compress(str(baby("mixtral")), out, recipe="q4g32")
    with pytest.raises(BudgetError, match="--context"):
        MoePackModel.load(out, device="cpu", context=1_000_000_010)
    limit = MoePackModel.load(out, device="cpu").pack.spec.max_position_embeddings
    assert MoePackModel.load(out, device="cpu").context == min(2048, limit)
    MoePackModel.load(out, device="cpu", context=limit + 1)
    assert "exceeds the model's" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-6, 0.7, 2.0])
def test_any_accepted_temperature_samples_a_token(temperature):
    """Every temperature SamplingParams accepts gives a token (no NaN from overflowing logits); a tiny one is
    the greedy choice."""
    from moepack.runtime.sampling import sample

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 40
    SamplingParams(temperature=temperature)
    token = sample(logits, temperature=temperature, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert 0 <= token < 1000
    if temperature <= 1e-6:
        assert token == int(logits.argmax())
