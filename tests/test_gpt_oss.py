"""GPT-OSS end to end: baby checkpoints made by transformers' own GptOssForCausalLM (bf16 with fused [E, ...]
expert tensors, and the same with MXFP4 expert blocks/scales) pack losslessly and reproduce transformers'
logits and greedy tokens, whole and under a squeezed expert budget; the MXFP4 decoder is bit-exact against
transformers' dequantisation; compress reads one expert's slice of a fused tensor at a time; lossy and
profiled packs match their dequantised references; every runtime technique runs on the family."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moepack.arch import adapter_for, spec_from_config
from moepack.compress import compress, load_expert
from moepack.errors import SourceError
from moepack.format import Pack
from moepack.runtime.api import MoePackModel
from moepack.source import ALIASES, Checkpoint
from moepack.source.mxfp4 import decode_mxfp4, encode_mxfp4

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely"
VARIANTS = ("bf16", "mxfp4")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    pytest.importorskip("transformers")
    from moepack.testing.gpt_oss import make_gpt_oss_checkpoint

    made = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = make_gpt_oss_checkpoint(tmp_path_factory.mktemp(f"gpt-oss-{variant}"),
                                                    mxfp4=variant == "mxfp4")
        return made[variant]

    return get


@pytest.fixture(scope="module")
def packs(source, tmp_path_factory):
    made = {}

    def get(variant: str, recipe: str | None = None):
        if (variant, recipe) not in made:
            out = tmp_path_factory.mktemp("packs") / f"{variant}-{recipe}.moepack"
            made[(variant, recipe)] = compress(str(source(variant)), out, recipe=recipe).path
        return made[(variant, recipe)]

    return get


@pytest.fixture(scope="module")
def hf(source):
    transformers = pytest.importorskip("transformers")
    made = {}

    def get(variant: str):  # the MXFP4 one is dequantised by transformers itself (no Triton on the CPU)
        if variant not in made:
            made[variant] = transformers.AutoModelForCausalLM.from_pretrained(
                source(variant), dtype=torch.float32, attn_implementation="eager").eval()
        return made[variant]

    return get


# --- MXFP4 -------------------------------------------------------------------------------------------
def test_mxfp4_decoder_is_bit_exact_against_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)  # [E, out, G, 16]
    scales = torch.randint(0, 253, (3, 10, 4), dtype=torch.uint8, generator=g)  # the whole exact range
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out]
    got = decode_mxfp4(blocks, scales)
    assert got.dtype == torch.bfloat16 and torch.equal(got.transpose(1, 2), want)
    wide = decode_mxfp4(blocks, scales, dtype=torch.float32)
    assert torch.equal(wide, got.float())  # every value is exact in bfloat16: nothing was rounded
    assert torch.isfinite(wide).all()


def test_mxfp4_decoder_refuses_what_it_cannot_decode_exactly():
    blocks = torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(SourceError, match="scale byte 253"):
        decode_mxfp4(blocks, torch.tensor([127, 253], dtype=torch.uint8), name="x.blocks")
    with pytest.raises(SourceError, match=r"x\.blocks.*do not match"):
        decode_mxfp4(blocks, torch.zeros(3, dtype=torch.uint8), name="x.blocks")
    with pytest.raises(SourceError, match="uint8"):
        decode_mxfp4(blocks.float(), torch.zeros(2, dtype=torch.uint8))


def test_mxfp4_encoder_rounds_to_the_nearest_code_and_inverts_the_decoder():
    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    blocks, scales = encode_mxfp4(w)
    d = decode_mxfp4(blocks, scales, dtype=torch.float32)
    unit = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)  # the block's 2^(s - 127)
    # at most half the widest gap between codes (4 to 6), or the clip of a block maximum in (6, 8) to 6
    err = (d - w).abs() / unit
    assert (err <= 2).all() and (err[(w / unit).abs() <= 6] <= 1).all() and err.max() > 0
    b2, s2 = encode_mxfp4(d)
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)


# --- architecture and reading ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_spec_and_tensor_names_cover_the_checkpoint(source, variant):
    ckpt = Checkpoint(source(variant))
    spec = spec_from_config(ckpt.config)
    assert spec.family == "gpt_oss" and spec.router_scoring == "topk_softmax" and spec.attention_sinks
    assert spec.expert_act == "clamped_swiglu" and spec.swiglu_limit == 0.5 and spec.expert_bias
    assert spec.sliding_layers == (True, False, True) and spec.sliding_window == 5
    assert spec.extra["mxfp4"] == (variant == "mxfp4")
    names = adapter_for(spec)
    assert set(names.dense_tensor_names()) | set(names.all_expert_tensor_names()) == set(ckpt.names())
    assert not set(names.dense_tensor_names()) & set(names.all_expert_tensor_names())


def released_config(layers: int, experts: int) -> dict:
    """config.json of openai/gpt-oss-20b (24 layers, 32 experts) / -120b (36, 128) as released."""
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
        "num_experts_per_tok": 4, "num_hidden_layers": layers, "num_key_value_heads": 8,
        "num_local_experts": experts, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
    }


@pytest.mark.parametrize("layers,experts", [(24, 32), (36, 128)])
def test_released_configs_give_the_specs_and_names_of_the_real_checkpoints(layers, experts):
    from moepack.errors import ModelConfigError, UnsupportedModelError

    spec = spec_from_config(released_config(layers, experts))
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.expert_shape()) == (layers, experts, 4, (2880, 2880))
    assert spec.rope.type == "yarn" and spec.rope.factor == 32 and spec.rope.truncate is False
    assert spec.sliding_layers[:2] == (True, False) and spec.sliding_window == 128 and spec.extra["mxfp4"]
    assert spec.eos_token_ids == (200002,) and spec.swiglu_limit == 7.0 and spec.qkv_bias and spec.o_bias
    names = adapter_for(spec)
    ref = names.expert_tensor_ref(5, 7, "up")
    assert (ref.name, ref.scales, ref.index, ref.rows, ref.step) == (
        "model.layers.5.mlp.experts.gate_up_proj_blocks", "model.layers.5.mlp.experts.gate_up_proj_scales", 7,
        (1, 5760), 2)
    down = names.expert_tensor_ref(5, 7, "down")
    assert down.name.endswith("down_proj_blocks") and down.transpose
    assert names.layer_tensor_names(0)["router"] == "model.layers.0.mlp.router.weight"
    with pytest.raises(UnsupportedModelError, match="quantization 'gptq'"):
        spec_from_config({**released_config(layers, experts), "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ModelConfigError, match="layer_types"):
        spec_from_config({**released_config(layers, experts), "layer_types": ["full_attention"]})


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_expert_is_read_as_its_slice_of_the_fused_tensor(source, variant, monkeypatch):
    """load_expert reads only expert e's slice (the largest read is one expert's share of gate_up), and the
    result is the expert transformers holds; compress never reads a whole fused expert tensor."""
    hf_model = pytest.importorskip("transformers").AutoModelForCausalLM.from_pretrained(
        source(variant), dtype=torch.float32)
    ckpt = Checkpoint(source(variant))
    spec = spec_from_config(ckpt.config)
    adapter = adapter_for(spec)
    w = load_expert(ckpt, adapter, 2, 3)
    fused = ckpt.info(adapter.expert_tensor_ref(2, 3, "gate").name)[2]
    assert ckpt.largest_read == fused // spec.num_experts
    experts = hf_model.model.layers[2].mlp.experts
    assert torch.equal(w["gate"].float(), experts.gate_up_proj[3][:, 0::2].T)
    assert torch.equal(w["up"].float(), experts.gate_up_proj[3][:, 1::2].T)
    assert torch.equal(w["down"].float(), experts.down_proj[3])
    assert all(t.shape == (spec.moe_intermediate_size, spec.hidden_size) for t in w.values())

    from moepack.source.safetensors_file import SafetensorsFile

    whole, real = [], SafetensorsFile.read

    def read(self, name, index=None):
        if index is None and name in set(adapter.all_expert_tensor_names()):
            whole.append(name)
        return real(self, name, index)

    monkeypatch.setattr(SafetensorsFile, "read", read)
    compress(str(source(variant)), ckpt.path.parent / f"{variant}-slices.moepack")
    assert whole == []


# --- parity with transformers ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_lossless_pack_matches_transformers_whole_and_squeezed(packs, hf, variant):
    path = packs(variant)
    with Pack(path) as pack:
        assert {pr.recipe for e in pack.manifest.experts for pr in e.projections.values()} == {"bf16"}
        dense = {t.name for t in pack.manifest.tensors}
        assert "model.layers.0.mlp.experts.gate_up_proj_bias" in dense  # biases are dense, not in blobs
        assert pack.manifest.source["dtype"] == ("mxfp4" if variant == "mxfp4" else "bfloat16")
    model = MoePackModel.load(path, device="cpu")
    ids = model.encode(PROMPT)
    assert len(ids) > 2 * model.spec.sliding_window  # the window matters
    with torch.no_grad():
        want = hf(variant)(torch.tensor([ids])).logits[0]
    got = model.logits(ids)
    assert (got - want).abs().max().item() < 1e-4
    greedy = hf(variant).generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert model.generate(ids, max_new_tokens=8, stop_at_eos=False).tokens == greedy
    probe = MoePackModel.load(path, device="cpu", vram="1TB", context=64)
    squeezed = MoePackModel.load(path, device="cpu", vram=probe.budget.vram_for(3), context=64)
    assert squeezed.budget.slots == 3
    assert torch.equal(squeezed.logits(ids), got)
    gen = squeezed.generate(ids, max_new_tokens=8, stop_at_eos=False)
    assert gen.tokens == greedy and squeezed.executor.cache.stats.misses > 3  # experts moved in and out


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_compute_is_as_close_as_transformers_bf16(packs, source, variant):
    """--dtype bfloat16 (activations, attention with sinks, biases widened per use): no further from the
    float32 logits than 1.5x transformers' own bf16 run; a squeezed budget changes nothing."""
    transformers = pytest.importorskip("transformers")
    path = packs(variant)
    exact = MoePackModel.load(path, device="cpu")
    ids = exact.encode(PROMPT * 3)
    want = exact.logits(ids)
    fast = MoePackModel.load(path, device="cpu", dtype="bfloat16")
    got = fast.logits(ids)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(source(variant), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = hf_bf16(torch.tensor([ids])).logits[0].float()

    def dist(a):
        return ((a - want).norm() / want.norm()).item()

    assert 0 < dist(got) <= 1.5 * dist(ref)
    probe = MoePackModel.load(path, device="cpu", dtype="bf16", vram="1TB")
    squeezed = MoePackModel.load(path, device="cpu", dtype="bf16", vram=probe.budget.vram_for(3))
    assert torch.equal(squeezed.logits(ids), got)


def dequantised_reference(path):
    from moepack.evaluate import decoded_executor
    from moepack.runtime.model import MoeModel

    with Pack(path) as pack:
        executor = decoded_executor(pack)
        dense = {t.name: pack.tensor(t.name).clone() for t in pack.manifest.tensors}
        return MoeModel(pack.spec, dense, executor)


@pytest.mark.parametrize("variant,recipe", [("bf16", "q4g32"), ("mxfp4", "q3g32")])
def test_lossy_pack_matches_the_dequantised_reference(packs, hf, variant, recipe, exact_prefill):
    path = packs(variant, recipe)
    model = MoePackModel.load(path, device="cpu")
    ids = model.encode(PROMPT)
    want = dequantised_reference(path)(torch.tensor(ids))
    got = model.logits(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    with torch.no_grad():
        exact = hf(variant)(torch.tensor([ids])).logits[0]
    assert (got - exact).abs().max().item() > 1e-3  # lossy indeed


def test_expert_terms_in_sparse_ffn_use_the_clamped_swiglu():
    """FloE on GPT-OSS: keep 1.0 is the dense expert; a smaller keep is the dense expert with each token's
    channels of smallest |up factor| masked out, biases and clamps included."""
    from moepack.kernels import Backend
    from moepack.runtime.expert_compute import ExpertTerms, expert_ffn, sparse_ffn

    g = torch.Generator().manual_seed(2)
    i, h = 40, 96
    w = {p: 0.2 * torch.randn(i, h, generator=g) for p in ("gate", "up", "down")}
    projs = {p: ({"values": t}, "fp32", (i, h)) for p, t in w.items()}
    bg, bu, bd = torch.randn(2, i, generator=g), torch.randn(2, i, generator=g), torch.randn(2, h, generator=g)
    gu = torch.stack((bg, bu), -1).flatten(1)  # [E, 2I] interleaved, gate first, as stored
    terms = ExpertTerms("clamped_swiglu", 0.7, 1.702, {0: (gu.bfloat16().float(), bd)})
    bg = gu.bfloat16().float()[:, 0::2]  # the bias as a bf16 pack holds it, widened
    bu = gu.bfloat16().float()[:, 1::2]
    x = torch.randn(5, h, generator=g)
    gate, up = x @ w["gate"].T + bg[1], (x @ w["up"].T + bu[1]).clamp(-0.7, 0.7) + 1
    act = gate.clamp(max=0.7) * torch.sigmoid(1.702 * gate.clamp(max=0.7)) * up
    want = act @ w["down"] + bd[1]
    assert (expert_ffn(x, projs, Backend.TORCH, terms, (0, 1)) - want).abs().max() < 1e-5
    assert (sparse_ffn(x, projs, Backend.TORCH, 1.0, terms, (0, 1))[0] - want).abs().max() < 1e-5
    from moepack.runtime.adaptive import channel_mask

    masked = (act * channel_mask(up, 0.5)) @ w["down"] + bd[1]
    y = torch.cat([sparse_ffn(x[j:j + 1], projs, Backend.TORCH, 0.5, terms, (0, 1))[0] for j in range(5)])
    assert (y - masked).abs().max() < 1e-5 and (y - want).abs().max() > 1e-3


def test_profiled_pack_reorders_channels_and_biases_together(source, hf, tmp_path):
    """A profiled compress stores each expert's channels in FloE order: the gate/up biases move with them,
    so the lossless pack still matches transformers; --target-ratio reaches its ratio against the MXFP4
    source's stored bytes."""
    from moepack.profile import profile

    src = str(source("mxfp4"))
    prof = profile(src, candidates=("bf16", "q4g32", "q3g32", "q2g32"), max_tokens=256, tune=False)
    assert any((p.channel_order != torch.arange(len(p.channel_order))).any() for p in prof.experts.values())
    path = compress(src, tmp_path / "ordered.moepack", recipe="bf16", profile=prof).path
    model = MoePackModel.load(path, device="cpu")
    ids = model.encode(PROMPT)
    with torch.no_grad():
        want = hf("mxfp4")(torch.tensor([ids])).logits[0]
    assert (model.logits(ids) - want).abs().max().item() < 1e-4
    report = compress(src, tmp_path / "ratio.moepack", target_ratio=1.2, profile=prof)
    assert 1.2 <= report.ratio <= 1.2 * 1.05
    assert report.source_expert_bytes == 3 * 3 * 6 * 96 * 64 * 17 // 32  # 4.25 bits per weight


# --- every runtime technique -----------------------------------------------------------------------------
def test_runtime_techniques_run_and_batches_equal_single_runs(packs):
    from moepack.runtime.throughput import generate_many, load_for_throughput

    path = packs("bf16", "q4g32")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (3, 11, 7)]
    alone = MoePackModel.load(path, context=64)
    want = [alone.generate(p, max_new_tokens=5, stop_at_eos=False).tokens for p in prompts]
    pm = load_for_throughput(path, vram=None, batches=3, slots=4, context=64)
    res = generate_many(pm, prompts, batches=3, max_new_tokens=5, stop_at_eos=False)
    assert [r.tokens for r in res.results] == want
    ids = prompts[1]
    exact = alone.logits(ids)
    for options in (dict(prefetch="fate", prefetch_min_prob=0.0, cache_policy="reuse"),
                    dict(bypass=True, cache_policy="lfu")):
        model = MoePackModel.load(path, vram=MoePackModel.load(path, vram="1TB", context=64).budget.vram_for(4),
                                  context=64, **options)
        assert torch.equal(model.logits(ids), exact), options
    little = MoePackModel.load(path, context=64, adaptive_k=0.5, fallback="off")
    sparse = MoePackModel.load(path, context=64, sparse_channels=0.5)
    for approx, counter in ((little, "little_tokens"), (sparse, "rows_kept")):
        out = approx.generate(ids, max_new_tokens=3, stop_at_eos=False)
        assert approx.executor.stats.counts[counter] > 0
        assert out.tokens and not torch.equal(approx.logits(ids), exact)
    # partial loads read only the kept rows of gate/down from the pack: the same numbers as FloE in place
    partial = MoePackModel.load(path, vram=MoePackModel.load(path, vram="1TB", context=64).budget.vram_for(2),
                                context=64, sparse_channels=0.5, partial_loads=True)
    got = partial.logits(ids)
    assert partial.executor.stats.counts["partial_loads"] > 0
    assert (got - sparse.logits(ids)).abs().max().item() < 1e-5


def test_cli_inspect_plan_and_eval(source, packs, tmp_path, monkeypatch):
    from moepack.cli.app import app

    monkeypatch.setenv("MOEPACK_HOME", str(tmp_path / "home"))  # the plan's hardware cache lives there
    runner = CliRunner()
    path = packs("mxfp4", "q4g32")
    res = runner.invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0 and "gpt_oss" in res.output and "q4g32" in res.output, res.output
    res = runner.invoke(app, ["plan", str(path), "--vram", "64MB", "--context", "128", "--link-gbps", "2",
                              "--trace-prompts", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["slots"] >= 2 and data["predicted_tokens_per_s"] > 0
    from moepack.evaluate import evaluate

    text = (PROMPT + " and more temperate. ") * 8
    lossless = evaluate(packs("mxfp4"), text, reference=str(source("mxfp4")), context=64, max_tokens=120)
    assert lossless.kl == pytest.approx(0.0, abs=1e-9)
    lossy = evaluate(path, text, reference=str(source("mxfp4")), context=64, max_tokens=120, decoded=True)
    assert lossy.kl > 0


def test_hub_aliases():
    assert ALIASES["gpt-oss-20b"] == "openai/gpt-oss-20b"
    assert ALIASES["gpt-oss-120b"] == "openai/gpt-oss-120b"
