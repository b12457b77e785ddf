"""OLMoE: RMSNorm on the full q and k projections (not per head), optional clip_qkv, attention_bias on
all four projections, every layer sparse, no shared expert."""

from __future__ import annotations

from moepack.arch.base import Adapter
from moepack.arch.spec import ModelSpec, common_fields, require
from moepack.errors import UnsupportedModelError


class OlmoeAdapter(Adapter):
    model_type = "olmoe"

    def spec_from_config(self, config: dict) -> ModelSpec:
        name = self.model_type
        f = common_fields(config, name, default_theta=10000.0)
        if f["head_dim"] * f["num_heads"] != f["hidden_size"]:
            raise UnsupportedModelError(
                f"olmoe: head_dim {f['head_dim']} x {f['num_heads']} heads != hidden_size {f['hidden_size']}")
        bias = bool(config.get("attention_bias", False))
        clip = config.get("clip_qkv")
        return ModelSpec(
            **f,
            moe_intermediate_size=int(require(config, "intermediate_size", name)),
            num_experts=int(config.get("num_experts") or require(config, "num_local_experts", name)),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="full",
            clip_qkv=None if clip is None else float(clip),
            sparse_layers=(True,) * f["num_layers"],
        )
