"""DeepSeek-V2/V3 (issue 20): baby checkpoints saved by transformers' own classes (random weights, odd MLA
widths, bf16, a dense first layer, shared experts, group-limited routing, V3's correction bias, YaRN with
mscale) run through compress -> pack -> runtime and reproduce transformers' logits and greedy tokens, whole
and with a squeezed expert budget; lossy packs match the dequantised reference; the budget counts MLA's
latent cache."""

from __future__ import annotations

import json

import pytest
import torch
from test_pack_parity import PROMPT, dequantised_reference

from moepack.arch import adapter_for, spec_from_config
from moepack.compress import compress
from moepack.errors import UnsupportedModelError
from moepack.runtime.api import MoePackModel
from moepack.runtime.budget import MemoryNeeds
from moepack.runtime.group_routing import grouped_topk
from moepack.runtime.mla import LatentCache, mla_scale
from moepack.runtime.model import MoeModel

FAMILIES = ("deepseek_v2", "deepseek_v3")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def packs(baby, tmp_path_factory):
    made = {}

    def get(family: str, recipe: str | None = None):
        if (family, recipe) not in made:
            out = tmp_path_factory.mktemp("ds") / f"{family}-{recipe}.moepack"
            made[family, recipe] = compress(str(baby(family, dtype="bfloat16")), out, recipe=recipe).path
        return made[family, recipe]

    return get


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def spec_of(path):
    return spec_from_config(json.loads((path / "config.json").read_text()))


def test_spec_and_names_match_what_transformers_saves(baby):
    from safetensors import safe_open

    for fam in FAMILIES:
        path = baby(fam, dtype="bfloat16")
        spec, names = spec_of(path), adapter_for(spec_of(path))
        with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
            on_disk = {n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()}  # noqa: SIM118
        assert set(names.dense_tensor_names()) | set(names.all_expert_tensor_names()) == set(on_disk)
        assert spec.sparse_layers == (False, True, True) and spec.head_dim == spec.qk_rope_head_dim == 16
        assert (spec.kv_lora_rank, spec.qk_nope_head_dim, spec.v_head_dim) == (48, 24, 20)
        assert (spec.n_group, spec.topk_group, spec.rope.type) == (4, 2, "yarn")
        assert "mlp_up" in names.layer_tensor_names(0) and "router" not in names.layer_tensor_names(0)
    v2, v3 = (spec_of(baby(f, dtype="bfloat16")) for f in FAMILIES)
    assert v2.shared_expert_intermediate_size == 2 * 96 and v3.shared_expert_intermediate_size == 96
    assert (v2.group_scoring, v2.router_scoring, v2.norm_topk_prob, v2.q_lora_rank) == ("max", "softmax", False, None)
    assert (v3.group_scoring, v3.router_scoring, v3.norm_topk_prob, v3.q_lora_rank) == ("top2", "sigmoid", True, 40)
    assert v3.score_correction_bias and v3.rope_interleave and v3.routed_scaling_factor == 2.5


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_pack_matches_transformers_whole_and_streaming(baby, packs, family):
    hf = hf_model(baby(family, dtype="bfloat16"))
    path = packs(family)
    whole = MoePackModel.load(path, device="cpu")
    ids = whole.encode(PROMPT)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    greedy_hf = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    probe = MoePackModel.load(path, device="cpu", vram="1TB", context=128)
    squeezed = MoePackModel.load(path, device="cpu", vram=probe.budget.vram_for(3), context=128)
    assert squeezed.budget.slots == 3 < squeezed.budget.total_experts
    for model in (whole, squeezed):
        assert (model.logits(ids) - want).abs().max().item() < 1e-4
        out = model.generate(ids, max_new_tokens=8, stop_at_eos=False)
        assert out.tokens == greedy_hf
    assert out.stats.cache_misses > 0  # the squeezed run streamed experts
    assert probe.budget.dense_bytes == probe.model.dense_bytes  # kv_b held in the compute dtype, counted so


@pytest.mark.parametrize("family,recipe", [("deepseek_v2", "q2g64+r8"), ("deepseek_v3", "q4g32")])
def test_lossy_pack_matches_dequantised_reference(packs, family, recipe, exact_prefill):
    path = packs(family, recipe)
    model = MoePackModel.load(path, device="cpu")
    ids = model.encode(PROMPT)
    want = dequantised_reference(path)(torch.tensor(ids))
    rel = ((model.logits(ids) - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_is_as_close_as_transformers_bf16(baby, packs, family):
    """--dtype bfloat16 (activations, latent cache and kv_b in bf16): no further from the float32 logits than
    1.5x transformers' own bf16 run; a squeezed budget gives the same numbers; the budget counts kv_b in bf16."""
    path = packs(family)
    exact = MoePackModel.load(path, device="cpu")
    ids = exact.encode(PROMPT * 3)
    want = exact.logits(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(baby(family, dtype="bfloat16"), dtype=torch.bfloat16)
    with torch.no_grad():
        hf_bf16 = hf.eval()(torch.tensor([ids])).logits[0].float()
    probe = MoePackModel.load(path, device="cpu", dtype="bf16", vram="1TB")
    got = probe.logits(ids)

    def dist(a):
        return ((a - want).norm() / want.norm()).item()

    assert 0 < dist(got) <= 1.5 * dist(hf_bf16)
    assert probe.budget.dense_bytes == probe.model.dense_bytes
    squeezed = MoePackModel.load(path, device="cpu", dtype="bf16", vram=probe.budget.vram_for(3))
    assert torch.equal(squeezed.logits(ids), got)


def test_budget_counts_the_latent_cache(packs):
    path = packs("deepseek_v3")
    model = MoePackModel.load(path, device="cpu", vram="1TB", context=96)
    spec = model.spec
    per_token = spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * 4  # float32 compute
    expanded = spec.num_layers * spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim
                                                   + spec.v_head_dim) * 4
    assert model.budget.kv_bytes == 96 * per_token and per_token * 3 < expanded
    cache = model.model.new_cache(capacity=40)
    assert isinstance(cache, LatentCache) and cache.nbytes == 40 * per_token
    bf16 = MemoryNeeds.of(model.pack, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert bf16.kv_bytes_per_token == per_token // 2


def test_batched_and_multi_sequence_steps_equal_single_runs(packs):
    """MLA per segment: a [B, T] batch (one segment of B rows) and forward_many over sequences of different
    lengths give each sequence's own logits."""
    model = MoePackModel.load(packs("deepseek_v2"), device="cpu").model
    a, b = torch.arange(5, 17), torch.arange(100, 112)
    single = [model(a), model(b)]
    batched = model(torch.stack([a, b]))
    for got, want in zip(batched, single, strict=True):
        assert (got - want).abs().max().item() < 1e-5
    caches = [model.new_cache(32), model.new_cache(32)]
    last = model.forward_many([a[:7].tolist(), b[:3].tolist()], caches)
    assert (last[0] - single[0][6]).abs().max().item() < 1e-5 and (last[1] - single[1][2]).abs().max() < 1e-5
    last = model.forward_many([a[7:].tolist(), b[3:].tolist()], caches)
    assert (last[0] - single[0][-1]).abs().max().item() < 1e-5 and (last[1] - single[1][-1]).abs().max() < 1e-5


def test_rotary_without_interleave_and_no_q_lora(baby):
    """V3 with rope_interleave off (rotate-half rotary) and one q projection still matches transformers."""
    path = baby("deepseek_v3", rope_interleave=False, q_lora_rank=None, num_hidden_layers=2)
    assert not spec_of(path).rope_interleave
    ids = torch.arange(3, 40, 2)
    with torch.no_grad():
        want = hf_model(path)(ids[None]).logits[0]
    assert (MoeModel.from_checkpoint(path)(ids) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_router_and_scale_match_transformers_modules(baby, family):
    """grouped_topk against transformers' own router module on many tokens (sets of experts and their weights),
    and the MLA softmax scale against its attention module's (YaRN mscale_all_dim folded in)."""
    hf = hf_model(baby(family))
    spec = spec_of(baby(family))
    layer = hf.model.layers[1]
    router = layer.mlp.gate
    x = torch.randn(512, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, hf_w, hf_ids = router(x)
    bias = getattr(router, "e_score_correction_bias", None)
    ids, w = grouped_topk(logits, spec, bias)
    order = hf_ids.sort(dim=-1)
    mine = ids.sort(dim=-1)
    assert torch.equal(order.values, mine.values)
    assert torch.allclose(hf_w.gather(1, order.indices), w.gather(1, mine.indices), rtol=0, atol=1e-6)
    assert (w[:, :-1] >= w[:, 1:]).all()  # largest weight first (big-little's little set)
    assert mla_scale(spec) == pytest.approx(layer.self_attn.scaling, rel=1e-12)
    assert mla_scale(spec) != pytest.approx((spec.qk_nope_head_dim + spec.qk_rope_head_dim) ** -0.5)
    if bias is not None:  # the data exercises the bias: selection without it differs
        assert not torch.equal(grouped_topk(logits, spec, None)[0].sort(-1).values, mine.values)


def test_big_little_applies_with_shared_experts(packs):
    """Big-little drops the routed experts' big half; the shared experts always run. It runs, drops, and
    threshold 1.0 (never drop) reproduces the plain run."""
    path = packs("deepseek_v3")
    plain = MoePackModel.load(path, device="cpu")
    ids = plain.encode(PROMPT)
    want = plain.logits(ids)
    never = MoePackModel.load(path, device="cpu", adaptive_k="1.0")
    assert torch.equal(never.logits(ids), want)
    dropping = MoePackModel.load(path, device="cpu", adaptive_k="0.5")
    out = dropping.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert out.stats.extra["little_token_share"] > 0


@pytest.mark.parametrize("change,match", [
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"n_group": 3}, "n_group"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
])
def test_unsupported_or_damaged_configs_are_refused(baby, change, match):
    config = json.loads((baby("deepseek_v2") / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=match):
        spec_from_config({**config, **change})


def test_real_v2_lite_config_and_aliases():
    """The fields DeepSeek-V2-Lite's config.json ships (v4 style: rope_scaling, no head_dim) give its shape;
    the latent cache is a ninth of expanded keys and values there."""
    from moepack.source.resolve import ALIASES

    lite = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
            "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
            "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False,
            "routed_scaling_factor": 1.0, "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 100000, "eos_token_id": 100001}
    spec = spec_from_config(lite)
    assert spec.sparse_layers.count(True) == 26 and spec.group_scoring is None and spec.rope.factor == 40
    assert LatentCache.bytes_per_token(spec, torch.bfloat16) == 27 * 576 * 2
    assert ALIASES["deepseek-v2-lite"] == "deepseek-ai/DeepSeek-V2-Lite"
    assert ALIASES["deepseek-v3"] == "deepseek-ai/DeepSeek-V3"
