"""GPT-OSS (openai/gpt-oss-20b, -120b): experts stored fused on disk, MXFP4 expert weights, expert biases,
a clamped SwiGLU, attention sinks, alternating sliding-window and full attention, and a router that takes the
top-k logits first and softmaxes only those.

On disk (transformers 5 `save_pretrained`, and the released checkpoints):

    model.layers.L.mlp.router.{weight [E, H], bias [E]}
    model.layers.L.mlp.experts.gate_up_proj       [E, H, 2I]  gate and up interleaved along the last axis
    model.layers.L.mlp.experts.gate_up_proj_bias  [E, 2I]     (gate at even, up at odd positions)
    model.layers.L.mlp.experts.down_proj          [E, I, H]   (already channel-major)
    model.layers.L.mlp.experts.down_proj_bias     [E, H]
    model.layers.L.self_attn.sinks                [nh]

or, MXFP4 (config `quantization_config.quant_method == "mxfp4"`), the two matrices as blocks and scales in the
output-major layout: `gate_up_proj_blocks` [E, 2I, H/32, 16] uint8 (two e2m1 codes a byte, low nibble
first) with `gate_up_proj_scales` [E, 2I, H/32] uint8 (e8m0: 2^(s - 127)), `down_proj_blocks`
[E, H, I/32, 16] with `down_proj_scales` [E, H, I/32]. The biases are dense tensors of the pack, never part
of the expert blobs (docs/format.md)."""

from __future__ import annotations

from moepack.arch.base import PROJS, Adapter, ExpertTensorRef
from moepack.arch.spec import ModelSpec, _finite, common_fields, require
from moepack.errors import ModelConfigError, UnsupportedModelError


def is_mxfp4(config: dict) -> bool:
    """Whether the checkpoint's experts are stored as MXFP4 blocks and scales."""
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


class GptOssAdapter(Adapter):
    model_type = "gpt_oss"
    fused_experts = True
    router_name = "router"

    def spec_from_config(self, config: dict) -> ModelSpec:
        name = self.model_type
        q = config.get("quantization_config")
        if q is not None and not is_mxfp4(config):
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise UnsupportedModelError(f"gpt_oss: quantization {method!r:.40} is not supported (only the "
                                        "released MXFP4 experts, or unquantised weights)")
        f = common_fields(config, name, default_theta=150000.0)
        n = f["num_layers"]
        limit, alpha = config.get("swiglu_limit", 7.0), config.get("swiglu_alpha", 1.702)
        for key, value in (("swiglu_limit", limit), ("swiglu_alpha", alpha)):
            if not _finite(value):
                raise ModelConfigError(f"gpt_oss config.json: {key} must be a finite number, got {value!r:.40}")
        types = config.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ModelConfigError(f"gpt_oss config.json: layer_types must list {n} of 'sliding_attention' / "
                                   f"'full_attention', got {types!r:.80}")
        window = config.get("sliding_window")
        bias = bool(config.get("attention_bias", True))
        return ModelSpec(
            **f,
            moe_intermediate_size=int(require(config, "intermediate_size", name)),
            num_experts=int(config.get("num_local_experts") or require(config, "num_experts", name)),
            norm_topk_prob=True,  # softmax over the selected logits sums to 1
            qkv_bias=bias,
            o_bias=bias,
            sparse_layers=(True,) * n,
            router_scoring="topk_softmax",
            router_bias=True,
            sliding_window=None if window is None else int(window),
            sliding_layers=tuple(t == "sliding_attention" and window is not None for t in types),
            attention_sinks=True,
            expert_bias=True,
            expert_act="clamped_swiglu",
            swiglu_limit=float(limit),
            swiglu_alpha=float(alpha),
            extra={"mxfp4": is_mxfp4(config)},
        )

    # --- experts: slices of the fused [E, ...] tensors ----------------------------------------------
    def _mxfp4(self) -> bool:
        return self.spec is not None and bool(self.spec.extra.get("mxfp4"))

    def expert_tensor_name(self, layer: int, expert: int, proj: str) -> str:
        """The fused tensor holding `proj` of every expert of the layer (MXFP4: its blocks)."""
        if proj not in PROJS:
            raise ValueError(f"proj must be one of {PROJS}, got {proj!r}")
        stem = f"model.layers.{layer}.mlp.experts.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
        return f"{stem}_blocks" if self._mxfp4() else stem

    def expert_tensor_ref(self, layer: int, expert: int, proj: str) -> ExpertTensorRef:
        """gate/up: the even/odd outputs of gate_up_proj; down: down_proj[e] as stored ([I, H]), or for MXFP4
        the decoded output-major [H, I] transposed."""
        name = self.expert_tensor_name(layer, expert, proj)
        i = self.spec.moe_intermediate_size if self.spec is not None else None
        first = 0 if proj == "gate" else 1
        if self._mxfp4():
            scales = name.removesuffix("_blocks") + "_scales"
            if proj == "down":
                return ExpertTensorRef(name, index=expert, scales=scales, transpose=True)
            return ExpertTensorRef(name, index=expert, scales=scales, rows=(first, 2 * i if i else None), step=2)
        if proj == "down":
            return ExpertTensorRef(name, index=expert)
        return ExpertTensorRef(name, index=expert, cols=(first, 2 * i if i else None, 2), transpose=True)

    def all_expert_tensor_names(self) -> list[str]:
        """Every stored tensor the experts are read from (each fused tensor once; MXFP4: blocks and scales)."""
        spec = self._bound()
        names = []
        for layer in spec.sparse_layer_ids:
            for proj in ("gate", "down"):
                ref = self.expert_tensor_ref(layer, 0, proj)
                names += [ref.name] + ([ref.scales] if ref.scales else [])
        return names

    # --- dense tensors ------------------------------------------------------------------------------
    def layer_tensor_names(self, layer: int) -> dict[str, str]:
        names = super().layer_tensor_names(layer)
        p = f"model.layers.{layer}"
        names["sinks"] = f"{p}.self_attn.sinks"
        names["expert_gu_bias"] = f"{p}.mlp.experts.gate_up_proj_bias"    # [E, 2I], gate/up interleaved
        names["expert_down_bias"] = f"{p}.mlp.experts.down_proj_bias"     # [E, H]
        return names
