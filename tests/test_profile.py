"""Profiling: frequencies match the router, one expert in memory at a time, sane errors and importance."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from moepack.profile import default_calibration_text, load_calibration, profile
from moepack.profile.profiler import KEEP_GRID, usable_candidates
from moepack.source import Checkpoint

FEW = ("fp16", "q4g64", "q2g64")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_embedded_calibration_text_is_packaged_and_tokenises(baby):
    text = default_calibration_text()
    assert 3000 < len(text.encode()) < 50000
    cal = load_calibration(baby("mixtral"), max_position=4096)
    assert cal.source == "embedded" and cal.windows.dim() == 2 and cal.tokens >= 1000


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_frequencies_sum_to_one_per_layer_and_match_the_router(baby, family):
    from moepack.runtime.model import MoeModel

    src = baby(family)
    prof = profile(str(src), candidates=("q4g64",), max_tokens=1024)
    ref = MoeModel.from_checkpoint(src)
    counts: dict[int, torch.Tensor] = {}

    def hook(layer, x, logits, ids, weights):
        counts[layer] = torch.bincount(ids.flatten(), minlength=ref.spec.num_experts)

    ref.route_hooks.append(hook)
    windows = load_calibration(src, max_tokens=1024, max_position=ref.spec.max_position_embeddings).windows  # what profile used
    with torch.inference_mode():
        ref.hidden_states(windows)
    assert sorted(counts) == list(ref.spec.sparse_layer_ids)
    for layer, c in counts.items():
        freqs = [prof.experts[(layer, e)].frequency for e in range(ref.spec.num_experts)]
        assert sum(freqs) == pytest.approx(1.0, abs=1e-12)
        assert [prof.experts[(layer, e)].tokens for e in range(ref.spec.num_experts)] == c.tolist()
    assert prof.tokens == windows.numel()


def test_profiling_holds_at_most_one_expert_and_reads_each_once(baby, monkeypatch):
    from moepack.arch import PROJS, adapter_for, spec_from_config

    src = baby("mixtral")
    ckpt = Checkpoint(src)
    spec = spec_from_config(ckpt.config)
    adapter = adapter_for(spec)
    layer_of = {adapter.expert_tensor_ref(layer, e, p).name: layer
                for layer in spec.sparse_layer_ids for e in range(spec.num_experts) for p in PROJS}
    live: dict[int, int] = {}  # id -> layer of expert tensors still alive
    reads: list[str] = []
    peak = {"tensors": 0}
    real_read = Checkpoint.read

    def read(self, name):
        t = real_read(self, name)
        if name in layer_of:
            assert set(live.values()) <= {layer_of[name]}, "experts of two layers alive at once"
            reads.append(name)
            key = id(t)
            live[key] = layer_of[name]
            weakref.finalize(t, live.pop, key, None)
            peak["tensors"] = max(peak["tensors"], len(live))
        return t

    monkeypatch.setattr(Checkpoint, "read", read)
    profile(str(src), candidates=("q4g64",), max_tokens=512, tune=False)
    assert sorted(reads) == sorted(layer_of)  # every expert tensor read exactly once
    assert peak["tensors"] <= len(PROJS)  # never more than one expert's three projections
    # tuning the `auto` scale: one more forward per scale plus the exact one, one expert at a time throughout
    from moepack.profile.tune import TUNE_BELOW, TUNE_KL, TUNE_REFINE, TUNE_SCALES

    reads.clear()
    peak["tensors"] = 0
    prof = profile(str(src), candidates=("q4g64",), max_tokens=512)
    tries = len(TUNE_SCALES) + TUNE_BELOW + TUNE_REFINE
    assert len(reads) <= (2 + tries) * len(layer_of) and peak["tensors"] <= len(PROJS)
    scales = [s for s, _ in prof.tune_curve]
    assert set(TUNE_SCALES) <= set(scales) and scales == sorted(scales) and len(scales) <= tries
    kl_at = dict(prof.tune_curve)
    if prof.adaptive_scale:
        assert kl_at[prof.adaptive_scale] <= TUNE_KL
        above = [s for s in scales if s > prof.adaptive_scale]
        assert not above or kl_at[above[0]] > TUNE_KL  # the next scale tried is over the budget


def test_errors_rank_recipes_and_importance_is_the_input_second_moment(baby):
    prof = profile(str(baby("olmoe")), candidates=FEW, max_tokens=1024)
    assert prof.candidates == FEW
    for (_layer, _e), ep in prof.experts.items():
        for proj in ("up", "gate", "down"):
            errs = ep.errors[proj]
            assert errs["fp16"] < 1e-5 < errs["q4g64"] < errs["q2g64"] < 1.0, (ep.layer, ep.expert, proj, errs)
        imp = ep.importance["gate"]
        assert imp is ep.importance["up"] and ep.importance["down"] is None
        assert imp.shape == (prof.experts[(0, 0)].importance["gate"].shape[0],) and bool((imp > 0).all())
    table = prof.error_table()
    assert len(table) == 3 * len(prof.experts)


def test_a_candidate_that_does_not_fit_the_shape_is_skipped_and_a_bad_one_is_an_error():
    from moepack.errors import CodecError

    # any row length fits (a group of 128 on 64 columns is one ragged group); a rank above 64 does not
    assert usable_candidates(["q4g128", "q4g64", "Q4G64", "q2g64+r80"], (64, 64)) == ("q4g128", "q4g64")
    with pytest.raises(CodecError):
        usable_candidates(["q5g64"], (64, 64))


def test_a_user_calibration_file(baby, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 40)
    prof = profile(str(baby("mixtral")), str(calib), candidates=("q4g64",), seq_len=128)
    assert prof.calib_source == str(calib) and prof.tokens % 128 == 0
    from moepack.errors import MoepackError

    with pytest.raises(MoepackError, match="cannot read"):
        profile(str(baby("mixtral")), str(tmp_path / "missing.txt"), candidates=("q4g64",))


def test_channel_subsampling_estimates_the_full_errors(baby):
    import math

    from moepack.arch import adapter_for, spec_from_config
    from moepack.compress import load_expert
    from moepack.profile import measure_errors

    src = baby("mixtral")
    ckpt = Checkpoint(src)
    adapter = adapter_for(spec_from_config(ckpt.config))
    w = load_expert(ckpt, adapter, 0, 1)  # [128, 128] each
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    imp = {"gate": x.square().mean(0), "up": x.square().mean(0), "down": None}
    cands = ("q4g64", "q2g64", "q2g64+r8")
    full = measure_errors(x, w, cands, imp)
    est = measure_errors(x, w, cands, imp, max_channels=48)
    for proj in full:
        assert est[proj]["q2g64+r8"] == full[proj]["q2g64+r8"]  # low-rank: always the whole matrix
        for r in ("q4g64", "q2g64"):
            assert abs(math.log(est[proj][r] / full[proj][r])) < math.log(1.5), (proj, r, est[proj][r], full[proj][r])
        assert est[proj]["q4g64"] < est[proj]["q2g64"]


def test_round_to_nearest_is_kept_where_it_gives_the_smaller_output_error(baby):
    from moepack.arch import adapter_for, spec_from_config
    from moepack.compress import load_expert
    from moepack.profile import measure_errors

    ckpt = Checkpoint(baby("mixtral"))
    w = load_expert(ckpt, adapter_for(spec_from_config(ckpt.config)), 1, 2)
    x = torch.randn(200, 128, generator=torch.Generator().manual_seed(1))
    imp = {"gate": x.square().mean(0), "up": x.square().mean(0), "down": None}
    cands = ("q3g64", "2:4+q4g64", "fp16")
    plain = measure_errors(x, w, cands, imp)
    rtn: dict[str, set[str]] = {}
    best = measure_errors(x, w, cands, imp, rtn=rtn)
    for proj in plain:
        assert best[proj]["q3g64"] <= plain[proj]["q3g64"]
        assert (best[proj]["q3g64"] < plain[proj]["q3g64"]) == ("q3g64" in rtn.get(proj, set()))
        assert best[proj]["2:4+q4g64"] == plain[proj]["2:4+q4g64"] and best[proj]["fp16"] == plain[proj]["fp16"]
    assert set().union(*rtn.values()) <= {"q3g64"}


def test_sparsity_errors_match_the_runtime_selection_on_fresh_inputs():
    """The profiled FloE error at each keep is the error of the runtime's own sparse_ffn (channels of
    largest |up| per token), and keeping every channel costs nothing."""
    from moepack.kernels import Backend
    from moepack.profile.profiler import sparsity_errors
    from moepack.runtime.executor import expert_ffn, sparse_ffn

    g = torch.Generator().manual_seed(7)
    inter, hidden = 48, 16
    w = {p: torch.randn(inter, hidden, generator=g) for p in ("gate", "up", "down")}
    x = torch.randn(20, hidden, generator=g)
    projs = {p: ({"values": t}, "fp32", (inter, hidden)) for p, t in w.items()}
    y = expert_ffn(x, projs, Backend.TORCH)
    grid = (0.25, 0.5, 0.75, 1.0)
    errs, order = sparsity_errors(x, w, grid)
    for keep, err in zip(grid, errs, strict=True):
        ys = torch.cat([sparse_ffn(x[i:i + 1], projs, Backend.TORCH, keep)[0] for i in range(len(x))])
        assert err == pytest.approx(float((y - ys).square().sum() / y.square().sum()), rel=1e-4, abs=1e-9)
    assert errs[-1] == pytest.approx(0.0, abs=1e-10) and errs[0] > errs[1] > errs[2] > 0
    # the channel order: a permutation, by how often each channel is among a token's largest |up| over the grid
    u = (x @ w["up"].T).abs()
    count = sum((u >= u.topk(max(1, math.ceil(k * inter)), dim=1).values[:, -1:]).sum(0) for k in grid)
    assert sorted(order.tolist()) == list(range(inter))
    assert count[order].tolist() == sorted(count.tolist(), reverse=True)


def test_drop_error_is_the_little_half_error_over_the_share_gap(baby):
    """ProfilingExecutor's c: sum ||y_little - y||^2 / sum (1 - share)^2 ||y||^2, recomputed here from each
    expert's output on every token, on a random layer input and random routing."""
    import torch.nn.functional as F

    from moepack.arch import adapter_for, spec_from_config
    from moepack.compress import load_expert
    from moepack.profile.profiler import ProfilingExecutor

    src = baby("mixtral")
    ckpt = Checkpoint(src)
    spec = spec_from_config(ckpt.config)
    adapter = adapter_for(spec)
    ex = ProfilingExecutor(ckpt, adapter, spec, ("q4g64",), max_channels=None, try_rtn=False)
    g = torch.Generator().manual_seed(3)
    t, k, layer = 40, spec.top_k, spec.sparse_layer_ids[0]
    x = torch.randn(t, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g).sort(1, descending=True).values
    out = ex.forward(layer, x, ids, w)
    ys = torch.stack([(F.silu(x @ e["gate"].float().T) * (x @ e["up"].float().T)) @ e["down"].float()
                      for e in (load_expert(ckpt, adapter, layer, j) for j in range(spec.num_experts))])  # [E, T, H]
    per = ys[ids, torch.arange(t)[:, None]]  # [T, k, H]
    full = (w[..., None] * per).sum(1)
    kl = max(1, k // 2)
    share = w[:, :kl].sum(1) / w.sum(1)
    little = (w[:, :kl, None] * per[:, :kl]).sum(1) / share[:, None]
    assert torch.allclose(out, full, atol=1e-5)
    c = float((little - full).square().sum() / ((1 - share).square() * full.square().sum(1)).sum())
    assert ex.drop_error[layer] == pytest.approx(c, rel=1e-4)
    assert len(ex.experts[(layer, 0)].sparsity) == len(KEEP_GRID)
    # energy: what each expert adds to the hidden state per routed token, over the layer's mean ||x||^2
    from moepack.profile.profiler import MIN_ROUTED

    x_energy = x.square().sum(1).mean()
    checked = 0
    for e in range(spec.num_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if len(tok) >= MIN_ROUTED:
            want = (w[tok, slot, None] * ys[e, tok]).square().sum(1).mean() / x_energy
            assert ex.experts[(layer, e)].energy == pytest.approx(float(want), rel=1e-4)
            checked += 1
        else:  # calibration (almost) never chose it: its output on the layer's tokens, at the mean w^2
            assert ex.experts[(layer, e)].energy > 0
    assert checked > 0


def test_search_scale_refines_between_the_last_pass_and_the_first_failure():
    from moepack.profile.tune import search_scale

    tried = []

    def kl(s):  # monotone: 0.01 nats/token per unit of scale, budget 0.02 -> the true limit is scale 2
        tried.append(s)
        return 0.01 * s

    chosen, curve = search_scale(kl, (0.5, 1.0, 4.0, 8.0), budget=0.02, refine=2)
    assert tried[:4] == [0.5, 1.0, 4.0, 8.0]  # the whole grid, for the record
    assert tried[4:] == pytest.approx([2.0, 2.0 * 2 ** 0.5])  # sqrt(1 * 4) passes, sqrt(2 * 4) fails
    assert chosen == pytest.approx(2.0) and [s for s, _ in curve] == sorted(tried)
    assert search_scale(kl, (16.0, 32.0), budget=0.02, below=2)[0] == 0.0  # none within, even halved: off
    tried.clear()
    chosen, _ = search_scale(kl, (4.0, 8.0), budget=0.02, refine=1, below=2)  # halved once (2 passes), refined
    assert tried == pytest.approx([4.0, 8.0, 2.0, 2.0 * 2 ** 0.5]) and chosen == pytest.approx(2.0)
    assert search_scale(kl, (0.5, 1.0), budget=0.02) == (1.0, [(0.5, 0.005), (1.0, 0.01)])  # all pass
