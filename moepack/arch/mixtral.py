"""Mixtral: `block_sparse_moe.{gate, experts.N.w1/w2/w3}`; softmax router, top-k always renormalised."""

from __future__ import annotations

from moepack.arch.base import Adapter
from moepack.arch.spec import ModelSpec, common_fields, require


class MixtralAdapter(Adapter):
    model_type = "mixtral"
    moe_prefix = "block_sparse_moe"
    expert_proj_names = {"gate": "w1", "up": "w3", "down": "w2"}

    def spec_from_config(self, config: dict) -> ModelSpec:
        f = common_fields(config, self.model_type, default_theta=1e6)
        window = config.get("sliding_window")
        return ModelSpec(
            **f,
            moe_intermediate_size=int(require(config, "intermediate_size", self.model_type)),
            num_experts=int(config.get("num_local_experts") or require(config, "num_experts", self.model_type)),
            norm_topk_prob=True,
            sparse_layers=(True,) * f["num_layers"],
            sliding_window=None if window is None else int(window),
            sliding_layers=(window is not None,) * f["num_layers"],
        )
