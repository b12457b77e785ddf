"""compress --target-ratio end to end: profile -> plan -> encode; the manifest keeps frequencies and errors."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.compress import compress
from moepack.format import Pack
from moepack.profile import ERROR_KIND, profile

runner = CliRunner()
FEW = ("fp16", "q4g64", "q3g64", "q2g64", "q2g32")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("target", [4, 9])
def test_target_ratio_is_met_and_the_manifest_keeps_the_profile(baby, tmp_path, target):
    src = str(baby("qwen3_moe"))
    prof = profile(src, candidates=FEW, max_tokens=1024)
    report = compress(src, tmp_path / "p.moepack", target_ratio=target, profile=prof)
    assert target <= report.ratio <= target * 1.03
    assert report.planned_ratio == pytest.approx(report.ratio, rel=0.01)
    assert report.expected_error is not None and report.expected_error > 0
    with Pack(report.path, verify=True) as pack:
        meta = pack.manifest.meta
        assert meta["error"] == ERROR_KIND and meta["plan"]["target_ratio"] == target
        assert meta["calibration"]["tokens"] == prof.tokens
        per_layer = defaultdict(float)
        for rec in pack.manifest.experts:
            per_layer[rec.layer] += rec.frequency
            assert rec.frequency == prof.experts[(rec.layer, rec.expert)].frequency
            for proj, pr in rec.projections.items():
                measured = prof.experts[(rec.layer, rec.expert)].errors[proj][pr.recipe]
                assert pr.error == pytest.approx(math.sqrt(measured), rel=1e-12)
        assert all(v == pytest.approx(1.0) for v in per_layer.values())
        recipes = {pr.recipe for rec in pack.manifest.experts for pr in rec.projections.values()}
        assert recipes <= set(FEW)
        # where the profile found round-to-nearest better, the pack holds exactly the RTN encoding
        from moepack.codecs import decode, parse_recipe, quantize_rtn
        from moepack.compress import load_expert
        from moepack.format import projection_parts
        from moepack.source import Checkpoint

        ckpt, checked = Checkpoint(src), 0
        from moepack.arch import adapter_for

        adapter = adapter_for(pack.spec)
        for rec in pack.manifest.experts:
            for proj, pr in rec.projections.items():
                if prof.encoder(rec.layer, rec.expert, proj, pr.recipe) != "rtn":
                    continue
                r = parse_recipe(pr.recipe)
                order = prof.experts[(rec.layer, rec.expert)].channel_order  # stored most selected first
                w = load_expert(ckpt, adapter, rec.layer, rec.expert)[proj][order]
                got = decode(projection_parts(pack.expert_blob(rec.layer, rec.expert), pr), r, pr.shape)
                assert got.equal(decode(quantize_rtn(w, r.bits, r.group), r, pr.shape))
                checked += 1
        assert meta["calibration"]["rtn_encoded"] >= checked


def test_recipe_with_calibration_records_frequencies_and_output_errors(baby, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. " * 30)
    report = compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="up=q2g64,gate=q4g64,down=q4g64",
                      calib=calib)
    with Pack(report.path) as pack:
        assert pack.manifest.meta["error"] == ERROR_KIND
        assert pack.manifest.meta["calibration"]["source"] == str(calib)
        rec = pack.manifest.experts[0]
        assert rec.frequency is not None and rec.projections["up"].recipe == "q2g64"
        assert rec.projections["up"].error > rec.projections["gate"].error > 0


def test_a_profiled_pack_stores_channels_most_selected_first_with_the_same_function(baby, tmp_path):
    """With calibration, compress stores each expert's intermediate channels in the profiled order (FloE's
    most selected first): the rows are exactly the source rows permuted, and the model computes the same."""
    import torch

    from moepack.arch import adapter_for
    from moepack.compress import CHANNEL_ORDER, load_expert
    from moepack.format import projection_parts
    from moepack.runtime.api import MoePackModel
    from moepack.source import Checkpoint

    src = str(baby("mixtral"))
    prof = profile(src, candidates=("fp32",), max_tokens=512, tune=False)
    ordered = compress(src, tmp_path / "ordered.moepack", recipe="fp32", profile=prof).path
    plain = compress(src, tmp_path / "plain.moepack", recipe="fp32").path
    ckpt, moved = Checkpoint(src), 0
    with Pack(ordered) as pack:
        assert pack.manifest.meta["channel_order"] == CHANNEL_ORDER
        adapter = adapter_for(pack.spec)
        for rec in pack.manifest.experts:
            order = prof.experts[(rec.layer, rec.expert)].channel_order
            assert sorted(order.tolist()) == list(range(len(order)))
            moved += int((order != torch.arange(len(order))).any())
            source = load_expert(ckpt, adapter, rec.layer, rec.expert)
            for proj, pr in rec.projections.items():
                got = projection_parts(pack.expert_blob(rec.layer, rec.expert), pr)["values"]
                assert torch.equal(got, source[proj][order])
    assert moved > 0
    ids = list(range(3, 40))
    a = MoePackModel.load(ordered, device="cpu").logits(ids)
    b = MoePackModel.load(plain, device="cpu").logits(ids)
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()  # only the summation order differs


def test_uniform_keeps_the_ladder_and_records_weight_errors(baby, tmp_path):
    report = compress(str(baby("mixtral")), tmp_path / "p.moepack", target_ratio=9, uniform=True)
    with Pack(report.path) as pack:
        assert pack.manifest.meta["error"].startswith("relative weight error")
        assert pack.manifest.experts[0].frequency is None
        assert len({pr.recipe for rec in pack.manifest.experts for pr in rec.projections.values()}) == 1


def test_cli_compress_target_ratio_then_inspect_json_and_plot(baby, tmp_path, monkeypatch):
    import moepack.compress as mod

    monkeypatch.setattr(mod, "DEFAULT_CANDIDATES", FEW)  # keep the test fast; the default list is longer
    out = tmp_path / "p.moepack"
    res = runner.invoke(app, ["compress", str(baby("olmoe")), "-o", str(out), "--target-ratio", "9", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert 9 <= summary["ratio"] <= 9 * 1.03
    assert summary["expected_error"] > 0 and summary["planned_ratio"] >= 9 and summary["calibration_tokens"] > 0
    png = tmp_path / "plot.png"
    res = runner.invoke(app, ["inspect", str(out), "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output[res.output.index("{"):])
    assert all(e["frequency"] is not None and all(v is not None for v in e["error"].values())
               for e in rep["experts"])
    assert rep["meta"]["plan"]["planned_ratio"] >= 9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "freq" in res.output


def test_unreachable_target_fails_before_profiling(baby, tmp_path, monkeypatch):
    import moepack.compress as mod
    from moepack.errors import CodecError

    def boom(*a, **k):
        raise AssertionError("profiled although the target is out of reach")

    monkeypatch.setattr(mod, "_profile", boom)
    with pytest.raises(CodecError, match="out of reach"):
        compress(str(baby("mixtral")), tmp_path / "p.moepack", target_ratio=40)
    assert not (tmp_path / "p.moepack").exists()


def test_any_hidden_size_reaches_9x_from_bf16(baby, tmp_path):
    """Hidden 160 is not a multiple of 64 or 128: with ragged last groups every candidate fits, so the 1:4
    tier makes 9x reachable from a bf16 source (before format version 2 the cap was q2g32's 5.33x)."""
    from moepack.compress import reachable_candidates
    from moepack.profile.profiler import DEFAULT_CANDIDATES, EXTREME_CANDIDATES, usable_candidates

    shape = (192, 160)
    assert usable_candidates(DEFAULT_CANDIDATES + EXTREME_CANDIDATES, shape) == DEFAULT_CANDIDATES + EXTREME_CANDIDATES
    assert set(EXTREME_CANDIDATES) <= set(reachable_candidates(None, 9, shape, 2))
    src = str(baby("qwen3_moe", hidden_size=160, dtype="bfloat16"))
    prof = profile(src, candidates=("q4g128", "q2g64", "1:4+q4g128", "1:4+q3g128"), max_tokens=512)
    report = compress(src, tmp_path / "p.moepack", target_ratio=9, profile=prof)
    assert 9 <= report.ratio <= 9 * 1.03
    with Pack(report.path, verify=True) as pack:
        shapes = {tuple(pr.shape) for rec in pack.manifest.experts for pr in rec.projections.values()}
        assert all(s[1] == 160 for s in shapes)
        assert pack.manifest.format_version == 2
    # the runtime runs it: the compiled kernels (ragged last groups) agree with the pure-torch reference
    import torch

    from moepack.runtime.api import MoePackModel

    ids = list(range(3, 40))
    ref = MoePackModel.load(report.path, device="cpu", backend="torch").logits(ids)
    got = MoePackModel.load(report.path, device="cpu").logits(ids)
    assert bool(torch.isfinite(ref).all())
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2
