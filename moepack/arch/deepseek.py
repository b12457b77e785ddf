"""DeepSeek-V2 and DeepSeek-V3 (and models built on them): multi-head latent attention, shared experts beside
the routed ones, leading dense layers, grouped routing.

- **MLA.** `kv_a_proj_with_mqa` maps x to a latent of `kv_lora_rank` (RMSNormed by `kv_a_layernorm`) plus one
  rotary key of `qk_rope_head_dim` shared by every head; `kv_b_proj` expands the latent into each head's
  key (`qk_nope_head_dim`) and value (`v_head_dim`). Queries come from `q_proj`, or, with `q_lora_rank`, from
  `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`. The runtime (runtime/mla.py) caches the latent and the rotary
  key, not expanded keys and values. The attention scale is `(nope + rope)^-0.5`, times YaRN's
  `mscale(factor, mscale_all_dim)^2` under a scaled RoPE, as transformers applies it.
- **Experts.** `mlp.experts.N.{gate,up,down}_proj` per expert on disk; `mlp.shared_experts` is one ungated
  SwiGLU of `n_shared_experts * moe_intermediate_size` channels; layers below `first_k_dense_replace` are
  dense MLPs of `intermediate_size`.
- **Routing** (transformers' DeepseekV2/V3TopkRouter). V2: softmax scores; `topk_method`
  `group_limited_greedy` keeps the `topk_group` groups with the largest best score; the top-k weights are the
  scores times `routed_scaling_factor`, never renormalised (transformers' V2 ignores `norm_topk_prob`). V3:
  sigmoid scores; selection on scores + `e_score_correction_bias`, groups ranked by their best two; weights
  are the plain scores of the chosen experts, renormalised when `norm_topk_prob`, times the scaling factor."""

from __future__ import annotations

from moepack.arch.base import Adapter
from moepack.arch.spec import ModelSpec, _is_int, common_fields, require
from moepack.errors import ModelConfigError, UnsupportedModelError


def _int(config: dict, key: str, family: str, default: int | None = None, *, limit: int = 1 << 22) -> int:
    value = config.get(key, default)
    if value is None:
        value = require(config, key, family)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or not 0 <= value <= limit:
        raise ModelConfigError(f"{family} config.json: {key} must be an integer in [0, {limit}], got {value!r:.40}")
    return value


class DeepseekV2Adapter(Adapter):
    model_type = "deepseek_v2"
    expert_proj_names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    def spec_from_config(self, config: dict) -> ModelSpec:
        name = self.model_type
        f = common_fields(config, name, default_theta=10000.0)
        n = f["num_layers"]
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedModelError(f"{name}: attention_bias / mlp_bias are not supported (no released "
                                        "DeepSeek checkpoint uses them)")
        quant = config.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise UnsupportedModelError(
                f"{name}: the checkpoint's weights are quantised ({method}); moepack reads bf16/fp16/fp32 "
                "checkpoints: convert it to bf16 first (DeepSeek's fp8_cast_bf16.py)")
        freq = _int(config, "moe_layer_freq", name, 1, limit=1 << 12)
        if freq != 1:
            raise UnsupportedModelError(f"{name}: moe_layer_freq {freq} is not supported (transformers ignores "
                                        "it: every layer from first_k_dense_replace on is sparse)")
        experts = _int(config, "n_routed_experts", name, config.get("num_experts"), limit=1 << 16)
        first_dense = _int(config, "first_k_dense_replace", name, 0, limit=1 << 12)
        rope = _int(config, "qk_rope_head_dim", name, limit=1 << 16)
        q_rank = config.get("q_lora_rank")
        if _int(config, "kv_lora_rank", name) < 1:
            raise ModelConfigError(f"{name}: kv_lora_rank must be a positive integer (latent attention)")
        fields = dict(
            f,
            head_dim=rope,
            num_kv_heads=f["num_heads"],
            moe_intermediate_size=_int(config, "moe_intermediate_size", name),
            num_experts=experts,
            sparse_layers=tuple(i >= first_dense and experts > 0 for i in range(n)),
            dense_intermediate_size=_int(config, "intermediate_size", name) or None,
            shared_expert_intermediate_size=(_int(config, "n_shared_experts", name, 0, limit=1 << 12)
                                             * _int(config, "moe_intermediate_size", name)),
            kv_lora_rank=_int(config, "kv_lora_rank", name),
            q_lora_rank=None if q_rank is None else _int(config, "q_lora_rank", name),
            qk_nope_head_dim=_int(config, "qk_nope_head_dim", name, limit=1 << 16),
            qk_rope_head_dim=rope,
            v_head_dim=_int(config, "v_head_dim", name, limit=1 << 16),
            routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        )
        fields.update(self._routing(config, experts))
        return ModelSpec(**fields)

    def _routing(self, config: dict, experts: int) -> dict:
        name = self.model_type
        method = config.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"{name}: topk_method {method!r} is not supported "
                                        "(greedy, group_limited_greedy)")
        scoring = config.get("scoring_func") or "softmax"
        if scoring != "softmax":
            raise UnsupportedModelError(f"{name}: scoring_func {scoring!r} is not supported (softmax)")
        grouped = method == "group_limited_greedy"
        return dict(
            norm_topk_prob=False, router_scoring="softmax", rope_interleave=True,
            n_group=_int(config, "n_group", name, 1, limit=1 << 16) or 1 if grouped else 1,
            topk_group=_int(config, "topk_group", name, 1, limit=1 << 16) or 1 if grouped else 1,
            group_scoring="max" if grouped else None,
        )

    # --- names -------------------------------------------------------------------------------------
    def layer_tensor_names(self, layer: int) -> dict[str, str]:
        """Base names with MLA's projections in place of q/k/v (roles q_a q_a_norm q_b mla_q kv_a kv_a_norm
        kv_b; see docs/architecture.md), the shared experts, and V3's score correction bias."""
        spec = self._bound()
        names = super().layer_tensor_names(layer)
        for role in ("q", "k", "v"):
            del names[role]
        a = f"model.layers.{layer}.self_attn"
        if spec.q_lora_rank is None:
            names["mla_q"] = f"{a}.q_proj.weight"
        else:
            names.update(q_a=f"{a}.q_a_proj.weight", q_a_norm=f"{a}.q_a_layernorm.weight",
                         q_b=f"{a}.q_b_proj.weight")
        names.update(kv_a=f"{a}.kv_a_proj_with_mqa.weight", kv_a_norm=f"{a}.kv_a_layernorm.weight",
                     kv_b=f"{a}.kv_b_proj.weight")
        if spec.is_sparse(layer) and spec.score_correction_bias:
            names["router_score_bias"] = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        return names

    def _shared_names(self, moe: str) -> dict[str, str]:
        if not self._bound().shared_expert_intermediate_size:
            return {}
        s = f"{moe}.shared_experts"
        return {"shared_gate": f"{s}.gate_proj.weight", "shared_up": f"{s}.up_proj.weight",
                "shared_down": f"{s}.down_proj.weight"}


class DeepseekV3Adapter(DeepseekV2Adapter):
    model_type = "deepseek_v3"

    def _routing(self, config: dict, experts: int) -> dict:
        name = self.model_type
        method = config.get("topk_method") or "noaux_tc"
        scoring = config.get("scoring_func") or "sigmoid"
        if method != "noaux_tc" or scoring != "sigmoid":
            raise UnsupportedModelError(f"{name}: topk_method {method!r} with scoring_func {scoring!r} is not "
                                        "supported (noaux_tc with sigmoid, as transformers runs V3)")
        return dict(
            norm_topk_prob=bool(config.get("norm_topk_prob", True)), router_scoring="sigmoid",
            rope_interleave=bool(config.get("rope_interleave", True)),
            n_group=_int(config, "n_group", name, 1, limit=1 << 16) or 1,
            topk_group=_int(config, "topk_group", name, 1, limit=1 << 16) or 1,
            group_scoring="top2", score_correction_bias=True,
        )


def mla_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of the MLA roles (and `o`, which MLA widens to heads x v_head_dim) for format validation."""
    if not spec.kv_lora_rank:
        return {}
    h, nh, r = spec.hidden_size, spec.num_heads, spec.kv_lora_rank
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    q_rank = spec.q_lora_rank or 0
    return {"mla_q": (nh * qk, h), "q_a": (q_rank, h), "q_a_norm": (q_rank,), "q_b": (nh * qk, q_rank),
            "kv_a": (r + spec.qk_rope_head_dim, h), "kv_a_norm": (r,),
            "kv_b": (nh * (spec.qk_nope_head_dim + spec.v_head_dim), r), "o": (h, nh * spec.v_head_dim),
            "router_score_bias": (spec.num_experts,)}
