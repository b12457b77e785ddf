"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): qkv bias, a shared expert scaled by sigmoid(shared_expert_gate),
dense MLP layers chosen by `mlp_only_layers` / `decoder_sparse_step`, per-layer sliding window."""

from __future__ import annotations

from moepack.arch.base import Adapter
from moepack.arch.spec import ModelSpec, common_fields, require


def sparse_layers(config: dict, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """transformers' rule (Qwen2/3-MoE decoder layers): sparse unless listed in mlp_only_layers or off-step."""
    mlp_only = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    return tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"

    def spec_from_config(self, config: dict) -> ModelSpec:
        name = self.model_type
        f = common_fields(config, name, default_theta=10000.0)
        n = f["num_layers"]
        experts = int(config.get("num_experts") or require(config, "num_local_experts", name))
        window = None
        sliding = (False,) * n
        if config.get("use_sliding_window", False) and config.get("sliding_window"):
            window = int(config["sliding_window"])
            types = config.get("layer_types")
            if types:
                sliding = tuple(t == "sliding_attention" for t in types)
            else:
                max_window = int(config.get("max_window_layers", 28))
                sliding = tuple(bool((i + 1) % 2) and i < max_window for i in range(n))
        return ModelSpec(
            **f,
            moe_intermediate_size=int(require(config, "moe_intermediate_size", name)),
            num_experts=experts,
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            qkv_bias=bool(config.get("qkv_bias", True)),
            shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
            shared_expert_gate=bool(config.get("shared_expert_intermediate_size")),
            sparse_layers=sparse_layers(config, n, experts),
            dense_intermediate_size=int(config.get("intermediate_size") or 0) or None,
            sliding_window=window,
            sliding_layers=sliding,
        )

    def _shared_names(self, moe: str) -> dict[str, str]:
        if not self._bound().shared_expert_intermediate_size:
            return {}
        s = f"{moe}.shared_expert"
        return {"shared_gate": f"{s}.gate_proj.weight", "shared_up": f"{s}.up_proj.weight",
                "shared_down": f"{s}.down_proj.weight", "shared_expert_gate": f"{moe}.shared_expert_gate.weight"}
