"""The Mixtral-width benchmark checkpoint generator (moepack.testing.checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch

from moepack.errors import MoepackError
from moepack.testing.checkpoints import make_mixtral_width_checkpoint, mixtral_width_shape


def test_full_width_is_mixtral_8x7b():
    s = mixtral_width_shape(1)
    assert (s["hidden"], s["intermediate"], s["experts"], s["top_k"]) == (4096, 14336, 8, 2)
    assert (s["heads"], s["kv_heads"], s["hidden"] // s["heads"]) == (32, 8, 128)


@pytest.mark.parametrize("divisor", [1, 2, 4, 8])
def test_every_divisor_keeps_kquant_widths_and_head_dim(divisor):
    s = mixtral_width_shape(divisor)
    assert s["hidden"] % 256 == 0 and s["intermediate"] % 256 == 0
    assert s["hidden"] // s["heads"] == 128 and s["heads"] % s["kv_heads"] == 0


@pytest.mark.parametrize("divisor", [0, 3, 16])
def test_bad_divisor_is_refused(divisor):
    with pytest.raises(MoepackError, match="divisor"):
        mixtral_width_shape(divisor)


def test_scaled_checkpoint_has_mixtral_layout(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig

    path = make_mixtral_width_checkpoint(tmp_path / "mw", divisor=8, layers=1, vocab=512, shard_size="20MB")
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts) == (512, 1792, 8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (4, 1, 128, 512)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded at the requested size
    shapes = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(path / shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16
                shapes[name] = tuple(t.shape)
    assert shapes["model.layers.0.block_sparse_moe.experts.7.w1.weight"] == (1792, 512)
    assert shapes["model.layers.0.block_sparse_moe.experts.7.w2.weight"] == (512, 1792)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (128, 512)
    assert shapes["model.layers.0.block_sparse_moe.gate.weight"] == (8, 512)
    assert set(shapes) == set(index)
    assert (path / "tokenizer.json").exists()
