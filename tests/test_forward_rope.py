"""RoPE scaling: our inverse frequencies against transformers' ROPE_INIT_FUNCTIONS, and end-to-end parity
of baby models whose prompts run past the original context length."""

from __future__ import annotations

import pytest
import torch
from test_forward import TOL, check_parity, hf_model, prompt

from moepack.arch import spec_from_config
from moepack.runtime.layers import rope_inv_freq
from moepack.runtime.model import MoeModel

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 64,
                    "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
}


def qwen3_config(rope: dict) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        rope_parameters=dict(rope))


@pytest.mark.parametrize("name", ROPES)
def test_inv_freq_matches_transformers(name):
    config = qwen3_config(ROPES[name])
    spec = spec_from_config(config.to_dict())
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        cls = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeRotaryEmbedding
        want, want_scale = cls.compute_default_rope_parameters(config)
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    got, scale = rope_inv_freq(spec.rope, spec.head_dim, spec.max_position_embeddings)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-7)
    if rope_type == "dynamic":  # regrown for a sequence past max_position_embeddings
        want, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=1000)
        got, _ = rope_inv_freq(spec.rope, spec.head_dim, spec.max_position_embeddings, seq_len=1000)
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fam,rope", [
    ("qwen3_moe", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 6}),
    ("mixtral", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 6}),
    ("olmoe", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
])
def test_scaled_rope_models_match_transformers(baby, fam, rope):
    check_parity(baby(fam, num_hidden_layers=2, rope_parameters=rope), n=14, split=5)


def test_dynamic_rope_decode_matches_transformers(baby):
    """Dynamic NTK regrows its frequencies as the sequence passes max_position_embeddings; decode step by
    step must follow transformers' cached state exactly."""
    path = baby("qwen2_moe", num_hidden_layers=2, max_position_embeddings=8,
                rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    hf, ours = hf_model(path), MoeModel.from_checkpoint(path)
    ids = prompt(14, seed=4)
    with torch.no_grad():
        out = hf(ids[None, :5], use_cache=True)
        ref = [out.logits[0]]
        cache = out.past_key_values
        for i in range(5, 14):
            out = hf(ids[None, i:i + 1], cache=cache, use_cache=True)
            ref.append(out.logits[0])
    kv = ours.new_cache()
    got = [ours(ids[:5], kv)] + [ours(ids[i:i + 1], kv) for i in range(5, 14)]
    assert (torch.cat(ref) - torch.cat(got)).abs().max().item() < TOL
