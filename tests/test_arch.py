"""moepack.arch: config.json -> ModelSpec and on-disk tensor names, checked against checkpoints that
transformers itself saved; plus the checkpoint generators in moepack.testing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from conftest import FAMILIES
from safetensors import safe_open

from moepack.arch import SUPPORTED, ModelSpec, adapter_for, family, spec_from_config
from moepack.errors import UnsupportedModelError
from moepack.testing.checkpoints import make_random_checkpoint


def stored(path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for n in fh.keys():  # noqa: SIM118
                out[n] = tuple(fh.get_slice(n).get_shape())
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_names_match_what_transformers_saves(baby, fam):
    path = baby(fam)
    spec = spec_from_config(json.loads((path / "config.json").read_text()))
    names = adapter_for(spec)
    on_disk = stored(path)
    assert set(names.dense_tensor_names()) | set(names.all_expert_tensor_names()) == set(on_disk)
    assert not names.fused_experts
    for layer in spec.sparse_layer_ids:
        for proj in ("gate", "up", "down"):
            ref = names.expert_tensor_ref(layer, spec.num_experts - 1, proj)
            shape = on_disk[ref.name]
            assert (shape[::-1] if ref.transpose else shape) == spec.expert_shape()


def test_spec_fields_per_family(baby):
    specs = {f: spec_from_config(json.loads((baby(f) / "config.json").read_text())) for f in FAMILIES}
    mx, q2, q3, ol = (specs[f] for f in FAMILIES)
    assert (mx.num_experts, mx.top_k, mx.moe_intermediate_size, mx.hidden_size) == (8, 2, 128, 128)
    assert mx.norm_topk_prob and mx.rope.theta == 1e6 and mx.qk_norm is None and not mx.qkv_bias
    assert q2.qkv_bias and not q2.o_bias and q2.shared_expert_intermediate_size == 256 and q2.shared_expert_gate
    assert q2.sparse_layers == (True, False, True) and q2.dense_intermediate_size == 256
    assert "mlp_up" in adapter_for(q2).layer_tensor_names(1) and "router" not in adapter_for(q2).layer_tensor_names(1)
    assert q3.qk_norm == "head" and q3.head_dim == 32 and q3.norm_topk_prob
    assert ol.qk_norm == "full" and ol.clip_qkv is None and ol.eos_token_ids == (1,)


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError) as err:
        family("llama")
    assert all(s in str(err.value) for s in SUPPORTED)
    with pytest.raises(UnsupportedModelError, match="model_type"):
        spec_from_config({"hidden_size": 8})


def test_transformers_v4_style_configs():
    """Hub configs written by transformers 4.x: rope_theta + rope_scaling('type'), num_experts for Qwen3."""
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                num_experts_per_tok=2, max_position_embeddings=4096)
    q3 = spec_from_config({**base, "model_type": "qwen3_moe", "num_experts": 16, "moe_intermediate_size": 32,
                           "head_dim": 32, "rope_theta": 1e6, "rope_scaling": None, "decoder_sparse_step": 2,
                           "mlp_only_layers": [3], "intermediate_size": 96})
    assert q3.rope.type == "default" and q3.rope.theta == 1e6 and q3.num_experts == 16 and q3.head_dim == 32
    assert q3.sparse_layers == (False, True, False, False)
    mx = spec_from_config({**base, "model_type": "mixtral", "num_local_experts": 8, "intermediate_size": 128,
                           "rope_theta": 5e5, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 1024}})
    assert (mx.rope.type, mx.rope.factor, mx.rope.theta, mx.rope.original_max_position_embeddings) == \
        ("yarn", 4.0, 5e5, 1024)
    q2 = spec_from_config({**base, "model_type": "qwen2_moe", "num_experts": 4, "moe_intermediate_size": 32,
                           "shared_expert_intermediate_size": 64, "use_sliding_window": True, "sliding_window": 16,
                           "max_window_layers": 2})
    assert q2.qkv_bias and q2.sliding_window == 16 and q2.sliding_layers == (True, False, False, False)
    with pytest.raises(UnsupportedModelError, match="longrope"):
        spec_from_config({**base, "model_type": "mixtral", "num_local_experts": 8, "intermediate_size": 8,
                          "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        spec_from_config({**base, "model_type": "olmoe", "num_experts": 8, "intermediate_size": 8,
                          "hidden_act": "gelu"})


def test_tied_embeddings_and_unbound_adapter():
    cfg = dict(model_type="olmoe", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               num_experts=2, num_experts_per_tok=1, intermediate_size=4, tie_word_embeddings=True)
    spec = spec_from_config(cfg)
    assert "lm_head" not in adapter_for(spec).global_tensor_names()
    assert "lm_head" in family("olmoe").global_tensor_names()
    assert family("mixtral").expert_tensor_name(3, 5, "down") == "model.layers.3.block_sparse_moe.experts.5.w2.weight"
    with pytest.raises(ValueError, match="bind"):
        family("olmoe").layer_tensor_names(0)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_arch_is_pure_python():
    code = "import sys, moepack.arch; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_baby_checkpoint_is_deterministic(baby, tmp_path):
    from moepack.testing.checkpoints import make_baby_checkpoint

    again = make_baby_checkpoint("olmoe", tmp_path / "again")
    first = baby("olmoe")
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert hashlib.sha256((again / f).read_bytes()).digest() == hashlib.sha256((first / f).read_bytes()).digest()


def test_baby_tokenizer_round_trips(baby):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(baby("mixtral") / "tokenizer.json"))
    text = "To be, or not to be: 42 €"
    ids = tok.encode(text).ids
    assert max(ids) < 512 and tok.decode(ids) == text


def test_random_checkpoint_is_sharded_and_named_like_mixtral(tmp_path):
    path = make_random_checkpoint(tmp_path / "r", hidden=128, intermediate=256, layers=2, experts=4, vocab=300,
                                  shard_size=200_000, dtype="bfloat16")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    on_disk = stored(path)
    spec = spec_from_config(json.loads((path / "config.json").read_text()))
    names = adapter_for(spec)
    assert set(names.dense_tensor_names()) | set(names.all_expert_tensor_names()) == set(on_disk)
    assert on_disk["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (128, 256)
    from safetensors.torch import load_file

    t = load_file(str(path / index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w1.weight"]))
    w = t["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    assert w.dtype.is_floating_point and 0.03 < float(w.float().std()) < 0.15  # 1/sqrt(128) = 0.088
    again = make_random_checkpoint(tmp_path / "r2", hidden=128, intermediate=256, layers=2, experts=4, vocab=300,
                                   shard_size=200_000, dtype="bfloat16")
    assert (again / files[1]).read_bytes() == (path / files[1]).read_bytes()
