"""The fused one-token decode (runtime/fused_decode.py, the C++ op `decode_layer`) against the Python forward,
which is the reference: fresh baby checkpoints of every family and their config variants, decoded token by
token through both paths from the same prompt; logits, routing and the KV caches must agree to float32
tolerance and every decode step must have gone through the op."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from moepack.kernels import Backend
from moepack.kernels._build import CPP
from moepack.runtime.model import MoeModel

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not CPP.available(), reason="the C++ kernels are unavailable")

TOL = 2e-5  # max abs difference of logits (of magnitude ~1), float32 summation order only


def decode_both(path, *, seed: int, prompt_len: int = 6, steps: int = 7):
    """(fused logits, reference logits, fused routes, reference routes, op calls, caches) over `steps`
    decoded tokens, both paths fed the reference path's greedy tokens."""
    model = MoeModel.from_checkpoint(path)
    assert model.fused is not None, model.decode_path
    fused = model.fused
    calls = []
    op = fused.op
    fused.op = lambda *a: calls.append(1) or op(*a)
    routes: dict[str, list] = {"fused": [], "ref": []}
    side = ["ref"]
    model.route_hooks.append(lambda layer, x, logits, ids, w: routes[side[0]].append(
        (layer, ids.tolist(), w.clone(), logits.clone())))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (prompt_len,), generator=g)
    caches = {"fused": model.new_cache(capacity=3), "ref": model.new_cache(capacity=3)}  # both grow
    out: dict[str, list] = {"fused": [], "ref": []}
    model.fused = None
    for name in ("fused", "ref"):
        side[0] = name
        out[name].append(model(ids, caches[name])[-1:])
    routes = {"fused": [], "ref": []}
    for _ in range(steps):
        tok = torch.tensor([int(out["ref"][-1][-1].argmax())])
        for name in ("fused", "ref"):
            side[0] = name
            model.fused = fused if name == "fused" else None
            out[name].append(model(tok, caches[name]))
    return torch.cat(out["fused"]), torch.cat(out["ref"]), routes, len(calls), caches, model


def check(path, seed: int = 0) -> None:
    got, want, routes, calls, caches, model = decode_both(path, seed=seed)
    steps = got.shape[0] - 1
    assert calls == steps * model.spec.num_layers  # every decode step, every layer through the op
    assert (got - want).abs().max().item() < TOL
    assert len(routes["fused"]) == len(routes["ref"]) > 0
    for (la, ia, wa, lga), (lb, ib, wb, lgb) in zip(routes["fused"], routes["ref"], strict=True):
        assert la == lb and ia == ib
        assert (wa - wb).abs().max().item() < TOL and (lga - lgb).abs().max().item() < TOL
    a, b = caches["fused"], caches["ref"]
    assert a.length == b.length
    for layer in range(model.spec.num_layers):
        for x, y in ((a.k[layer], b.k[layer]), (a.v[layer], b.v[layer])):
            assert (x[:, :, : a.length] - y[:, :, : b.length]).abs().max().item() < TOL


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_decode_matches_python_forward(baby, fam, seed):
    check(baby(fam, num_hidden_layers=2), seed=seed)


@pytest.mark.parametrize("fam,overrides", [
    ("mixtral", {"sliding_window": 4}),
    ("olmoe", {"clip_qkv": 0.3, "attention_bias": True}),
    ("qwen3_moe", {"decoder_sparse_step": 2, "norm_topk_prob": False, "attention_bias": True}),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1,
                   "norm_topk_prob": True}),
    ("qwen3_moe", {"partial_rotary_factor": 0.5}),
])
def test_fused_decode_config_variants(baby, fam, overrides):
    check(baby(fam, num_hidden_layers=2, **overrides), seed=3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_decode_16_bit_dense_weights(baby, dtype):
    path = baby("mixtral", dtype=dtype, num_hidden_layers=2)
    model = MoeModel.from_checkpoint(path)
    assert model.ops[0]["qkv"].w.dtype == getattr(torch, dtype)  # kept 16-bit, widened in the op
    check(path, seed=4)


def test_fused_decode_greedy_matches_python_forward(baby):
    path = baby("qwen2_moe", num_hidden_layers=2)
    model = MoeModel.from_checkpoint(path)
    ids = torch.randint(3, 500, (9,), generator=torch.Generator().manual_seed(5))
    fused = model.greedy(ids, 12)
    model.fused = None
    assert fused == model.greedy(ids, 12)


def test_decode_path_names_why_the_op_is_not_used(baby, monkeypatch):
    path = baby("mixtral", num_hidden_layers=2)
    assert MoeModel.from_checkpoint(path).decode_path.startswith("fused C++ layer op")
    monkeypatch.setenv("MOEPACK_FUSED_DECODE", "0")
    model = MoeModel.from_checkpoint(path)
    assert model.fused is None and "MOEPACK_FUSED_DECODE=0" in model.decode_path


def test_torch_backend_and_bf16_compute_take_the_python_forward(baby):
    path = baby("mixtral", num_hidden_layers=2)
    base = MoeModel.from_checkpoint(path)
    model = MoeModel(base.spec, base.w, base.executor, backend=Backend.TORCH)
    assert model.fused is None and "TORCH" in model.decode_path
    model = MoeModel(base.spec, base.w, base.executor, dtype=torch.bfloat16)
    assert model.fused is None and "float32" in model.decode_path


@pytest.mark.parametrize("family,kw", [
    ("qwen3_moe", {}),
    ("qwen2_moe", {"slots": 3, "prefetch": "fate", "prefetch_min_prob": 0.0}),
    ("mixtral", {"slots": 4, "adaptive_k": 0.9, "sparse_channels": 0.8}),
])
def test_pack_generation_same_through_both_paths(baby, tmp_path, family, kw):
    """A pack through the streaming executor (budgeted cache, prefetch hooks, big-little): the same tokens
    and counters with the op as with the Python forward, and --stats / --json name the decode path."""
    from moepack.compress import compress
    from moepack.runtime.api import MoePackModel

    pack = compress(str(baby(family, num_hidden_layers=2)), tmp_path / "p.moepack", recipe="q4g32").path
    kw = dict(kw)
    slots = kw.pop("slots", None)
    if slots is not None:
        probe = MoePackModel.load(pack, device="cpu", vram="1TB", context=64)
        kw["vram"] = probe.budget.vram_for(slots)
    runs = {}
    for name in ("fused", "ref"):
        model = MoePackModel.load(pack, device="cpu", context=64, **kw)
        assert model.model.fused is not None and model.executor.mix_op is not None
        if name == "ref":
            model.model.fused = model.executor.mix_op = None
        ids = torch.randint(3, 500, (8,), generator=torch.Generator().manual_seed(6)).tolist()
        g = model.generate(ids, max_new_tokens=10, stop_at_eos=False)
        runs[name] = (g.tokens, g.stats.expert_calls, g.stats.cache_hits, g.stats.extra["decode_path"])
    assert runs["fused"][:3] == runs["ref"][:3]
    assert runs["fused"][3] == "fused C++ layer op"


@pytest.mark.parametrize("recipe", ["bf16", "q4g32", "q3g32", "q2g64", "q4g32+r4", "q4g64@160", "q2g64d", "q4g128d"])
def test_experts_op_equals_expert_by_expert(baby, tmp_path, recipe):
    """`moe_token` (one token's experts in one call) against the executor's one-by-one products on random
    inputs: the same ops in the same order, so the same bits (ragged groups and 8-bit metadata too: q4g64 on
    a hidden size of 160, the d recipes). A low-rank recipe is not run by the op."""
    from moepack.compress import compress
    from moepack.runtime.api import MoePackModel

    recipe, _, hidden = recipe.partition("@")
    shape = {"hidden_size": int(hidden)} if hidden else {}
    pack = compress(str(baby("qwen3_moe", num_hidden_layers=2, **shape)), tmp_path / "p.moepack",
                    recipe=recipe).path
    model = MoePackModel.load(pack, device="cpu", context=32)
    ex, spec = model.executor, model.spec
    op = ex.mix_op
    assert op is not None
    calls = []
    g = torch.Generator().manual_seed(8)
    for layer in spec.sparse_layer_ids:
        for _ in range(3):
            x = torch.randn(1, spec.hidden_size, generator=g)
            ids = torch.randperm(spec.num_experts, generator=g)[: spec.top_k][None]
            w = torch.rand(1, spec.top_k, generator=g)
            ex.mix_op = lambda *a: calls.append(1) or op(*a)
            got = ex.forward(layer, x, ids, w)
            ex.mix_op = None
            want = ex.forward(layer, x, ids, w)
            assert torch.equal(got, want)
    assert len(calls) == (0 if "+r" in recipe else 3 * len(spec.sparse_layer_ids))
