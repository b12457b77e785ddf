"""Qwen3-MoE: per-head RMSNorm on q and k (over head_dim), no qkv bias by default, no shared expert;
dense MLP layers chosen as in Qwen2-MoE."""

from __future__ import annotations

from moepack.arch.base import Adapter
from moepack.arch.qwen2_moe import sparse_layers
from moepack.arch.spec import ModelSpec, common_fields, require


class Qwen3MoeAdapter(Adapter):
    model_type = "qwen3_moe"

    def spec_from_config(self, config: dict) -> ModelSpec:
        name = self.model_type
        f = common_fields(config, name, default_theta=10000.0)
        n = f["num_layers"]
        experts = int(config.get("num_experts") or require(config, "num_local_experts", name))
        window = None
        if config.get("use_sliding_window", False) and config.get("sliding_window"):
            window = int(config["sliding_window"])
        bias = bool(config.get("attention_bias", False))
        return ModelSpec(
            **f,
            moe_intermediate_size=int(require(config, "moe_intermediate_size", name)),
            num_experts=experts,
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="head",
            sparse_layers=sparse_layers(config, n, experts),
            dense_intermediate_size=int(config.get("intermediate_size") or 0) or None,
            sliding_window=window,
            sliding_layers=(window is not None,) * n,
        )
