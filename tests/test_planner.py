"""The planner's cost model on hand-computed cases, its choices for synthetic hardware, and `plan --json`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.runtime.planner import Hardware, ModelShape, choose, predict, slots_for

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(**kw) -> ModelShape:
    base = dict(name="toy", num_layers=1, sparse_layers=1, num_experts=4, top_k=2, hidden=8, intermediate=8,
                expert_bytes=1_000_000, dense_bytes=10_000_000, kv_bytes_per_token=1000, workspace_bytes=0)
    return ModelShape(**{**base, **kw})


HW = Hardware(link_gbps=1.0, expert_fixed_s=0.001, expert_token_s=0.0001, dense_token_s=0.0002,
              head_token_s=0.0005, overlap=1.0)


def test_prediction_by_hand():
    # uniform q = k/E = 0.5; 2 tokens: p = 1 - 0.5**2 = 0.75 per expert, U = 3 experts needed per layer.
    # 2 layers, 2 streaming slots: W = 6 streamed experts per step, r = 2/6 of last step's stay resident,
    # misses per layer = 4 * 0.75 * (1 - 0.75/3) = 2.25
    shape = toy(num_layers=2, sparse_layers=2)
    p = predict(shape, HW, batches=2, slots=2, hot=0)
    layer_compute = 3 * 0.001 + 2 * 2 * 0.0001 + 2 * 0.0002  # experts + expert tokens + dense
    layer_transfer = 2.25 * 1_000_000 / 1e9
    head = 2 * 0.0005
    assert p.loads_per_step == pytest.approx(4.5)
    assert p.compute_s == pytest.approx(2 * layer_compute + head)
    assert p.transfer_s == pytest.approx(2 * layer_transfer)
    assert p.step_s == pytest.approx(2 * max(layer_compute, layer_transfer) + head)
    assert p.tokens_per_s == pytest.approx(2 / p.step_s)
    # not pipelined: compute and transfer add up
    serial = predict(shape, HW, batches=2, slots=2, pipelined=False)
    assert serial.step_s == pytest.approx(2 * (layer_compute + layer_transfer) + head)
    # half overlap: max + half of min
    half = predict(shape, Hardware(**{**HW.to_json(), "overlap": 0.5}), batches=2, slots=2)
    lay = max(layer_compute, layer_transfer) + 0.5 * min(layer_compute, layer_transfer)
    assert half.step_s == pytest.approx(2 * lay + head)
    # one hot expert: never loaded; 2 streaming slots over W = 5.25 streamed experts
    hot = predict(shape, HW, batches=2, slots=3, hot=1)
    r = 2 / 5.25
    assert hot.loads_per_step == pytest.approx(7 * 0.75 * (1 - r * 0.75))
    # every expert fits: nothing moves in steady state
    assert predict(shape, HW, batches=2, slots=8).loads_per_step == 0


def test_calibrated_overlap_curve_and_plain_scale():
    shape = toy(num_layers=2, sparse_layers=2)
    curve = Hardware(**{**HW.to_json(), "overlap": 0.9, "overlap_curve": ((1, 0.0), (8, 1.0))})
    assert curve.overlap_at(1) == 0.0 and curve.overlap_at(8) == 1.0 and curve.overlap_at(64) == 1.0
    assert curve.overlap_at(4) == pytest.approx(3 / 7) and curve.overlap_at(None) == 0.9
    # one sequence in flight: the curve says nothing hides, so compute and transfer add up
    one = predict(shape, curve, batches=1, slots=2)
    assert one.step_s == pytest.approx(predict(shape, HW, batches=1, slots=2, pipelined=False).step_s)
    # the plain runtime's factor scales its whole step but the head, and leaves the engine alone
    plain = Hardware(**{**HW.to_json(), "plain_scale": 2.0})
    base = predict(shape, HW, batches=1, slots=2, pipelined=False, engine=False)
    scaled = predict(shape, plain, batches=1, slots=2, pipelined=False, engine=False)
    assert scaled.step_s - 0.0005 == pytest.approx(2 * (base.step_s - 0.0005))
    assert predict(shape, plain, batches=2, slots=2).step_s == pytest.approx(predict(shape, HW, batches=2, slots=2).step_s)


def test_skewed_routing_needs_fewer_experts():
    skew = toy(probs=((0.9, 0.9, 0.1, 0.1),))
    assert predict(skew, HW, batches=2, slots=3).loads_per_step < predict(toy(), HW, batches=2, slots=3).loads_per_step


def test_batch_size_counts_sequences_in_flight():
    """2 batches of 3 sequences decode like 6 batches of one in steady state; a whole run differs only in how
    many prompt chunks share a step; KV memory grows with every sequence."""
    shape = toy(num_layers=2, sparse_layers=2)
    six = predict(shape, HW, batches=6, slots=3)
    two_by_three = predict(shape, HW, batches=2, slots=3, batch_size=3)
    assert two_by_three.tokens_per_s == pytest.approx(six.tokens_per_s)
    assert two_by_three.batch_size == 3
    lens = [5, 9, 3, 7, 4, 6]
    run6 = predict(shape, HW, batches=6, slots=3, prompts=lens, max_new_tokens=4)
    run23 = predict(shape, HW, batches=2, slots=3, batch_size=3, prompts=lens, max_new_tokens=4)
    assert run23.run_s < run6.run_s  # three prompts prefill per step instead of one
    assert slots_for(toy(), 40_000_000, 2, 1000, batch_size=3) == slots_for(toy(), 40_000_000, 6, 1000)


def test_measured_curves_replace_the_linear_terms():
    """Curves are interpolated piecewise linearly (extrapolated by the last slope); the engine factor is
    interpolated too but held flat beyond its points; it scales only the engine's compute."""
    hw = Hardware(link_gbps=1.0, expert_fixed_s=1.0, expert_token_s=1.0, dense_token_s=1.0, head_token_s=0.0,
                  expert_curve=((1, 1e-3), (8, 2e-3)), dense_curve=((1, 4e-4), (4, 1e-3)),
                  engine_scale=((1, 1.0), (4, 2.0)))
    assert hw.expert_s(1) == pytest.approx(1e-3) and hw.expert_s(4.5) == pytest.approx(1.5e-3)
    assert hw.expert_s(15) == pytest.approx(3e-3) and hw.dense_s(2) == pytest.approx(6e-4)
    assert hw.engine_factor(2) == pytest.approx(4 / 3) and hw.engine_factor(10) == pytest.approx(2.0)
    shape = toy(num_layers=2, sparse_layers=2)
    plain = predict(shape, hw, batches=2, slots=shape.total_experts, engine=False)
    engine = predict(shape, hw, batches=2, slots=shape.total_experts)
    assert engine.compute_s - 2 * hw.head_token_s == pytest.approx((plain.compute_s - 2 * hw.head_token_s) * 4 / 3)


def test_slots_for_budget():
    shape = toy(sparse_layers=8, num_layers=8)
    assert slots_for(shape, 10_000_000 + 4 * 100 * 1000 + 5_000_000, 4, 100) == 5
    assert slots_for(shape, None, 4, 100) == 32
    assert slots_for(shape, 10**12, 1, 100) == 32


def test_more_batches_when_transfer_bound():
    shape = toy(num_layers=8, sparse_layers=8, num_experts=8)
    slow = Hardware(link_gbps=0.1, expert_fixed_s=1e-4, expert_token_s=1e-5, dense_token_s=1e-5, head_token_s=1e-5)
    fast = Hardware(link_gbps=1000.0, expert_fixed_s=0.0, expert_token_s=1e-3, dense_token_s=1e-3, head_token_s=1e-3)
    vram = 10_000_000 + 20 * 1_000_000 + 64 * 100 * 1000  # about 20 of 64 experts fit
    p_slow, p_fast = choose(shape, slow, vram, context=100), choose(shape, fast, vram, context=100)
    assert 20 <= p_slow.best.slots < 32
    assert p_slow.best.batches >= 8
    assert p_fast.best.batches <= 2
    assert p_slow.best.transfer_s > p_slow.best.compute_s
    # the chosen point is within 95% of the best candidate
    assert p_slow.best.tokens_per_s >= 0.95 * max(p.tokens_per_s for p in p_slow.table)


def test_mixtral_on_paper_is_transfer_bound():
    shape = ModelShape.mixtral_8x7b()
    assert shape.expert_bytes * shape.total_experts == pytest.approx(90.2e9, rel=0.01)  # 45.1e9 params in bf16
    hw = Hardware(link_gbps=25, expert_fixed_s=shape.expert_bytes / 600e9, expert_token_s=6 * 4096 * 14336 / 50e12,
                  dense_token_s=1e-5, head_token_s=1e-5)
    plan = choose(shape, hw, 11 * 10**9, context=512)
    one = next(p for p in plan.table if p.batches == 1)
    assert one.tokens_per_s == pytest.approx(1 / (64 * 0.75 * shape.expert_bytes / 25e9), rel=0.2)
    assert plan.best.batches > 1 and plan.best.tokens_per_s > 3 * one.tokens_per_s


def test_plan_json_fields(baby, tmp_path, monkeypatch):
    from moepack.compress import compress

    monkeypatch.setenv("MOEPACK_HOME", str(tmp_path / "home"))  # the hardware cache lives there

    out = tmp_path / "p.moepack"
    compress(str(baby("mixtral")), out, recipe="q4g32")
    res = CliRunner().invoke(app, ["plan", str(out), "--vram", "64MB", "--context", "64", "--link-gbps", "2",
                                   "--trace-prompts", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    for key in ("batches", "slots", "hot_experts", "streaming_slots", "predicted_tokens_per_s", "time_per_step",
                "candidates", "hardware", "model", "reason"):
        assert key in data, key
    assert set(data["time_per_step"]) == {"compute_s", "transfer_s", "stall_s", "step_s"}
    assert data["hardware"]["link_gbps"] == 2.0 and data["model"]["probs_source"] == "trace"
    hw = data["hardware"]  # every expert fits 64MB: the engine was calibrated on short runs
    assert "engine calibrated" in hw["source"] and 0.0 <= hw["overlap"] <= 1.0 and hw["plain_scale"] > 0
    assert [n for n, _ in hw["overlap_curve"]] == [1, 8, 32] and all(0.0 <= o <= 1.0 for _, o in hw["overlap_curve"])
    assert len(hw["engine_scale"]) == 4 and all(f > 0 for _, f in hw["engine_scale"])
    assert len(hw["expert_curve"]) == len(hw["dense_curve"]) == 7
    assert data["slots"] >= 2 and data["batches"] in [c["batches"] for c in data["candidates"]]
    res = CliRunner().invoke(app, ["plan", str(out), "--vram", "1MB", "--link-gbps", "2", "--device-tflops", "1"])
    assert res.exit_code == 2 and "too small" in res.output or "fewer than" in res.output


def test_measured_curves_are_lower_envelopes():
    from moepack.runtime.calibrate import _lower_envelope

    # a burst inflated the 8-token point: it falls to the 16-token time; order and other points unchanged
    assert _lower_envelope([(1, 1.0), (2, 1.5), (8, 3.4), (16, 2.0), (32, 2.5)]) == (
        (1, 1.0), (2, 1.5), (8, 2.0), (16, 2.0), (32, 2.5))
