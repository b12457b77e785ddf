"""ModelSpec: everything the lean forward needs, normalised from a Hugging Face config.json.

Pure Python (no torch, no transformers), so the pack reader and the CLI can import it cheaply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moepack.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters, following transformers' `rope_parameters` (v5) / `rope_scaling` (v4)."""

    type: str = "default"                      # one of ROPE_TYPES
    theta: float = 10000.0
    factor: float | None = None                # linear, dynamic, yarn, llama3
    original_max_position_embeddings: int | None = None   # yarn, llama3
    low_freq_factor: float | None = None       # llama3
    high_freq_factor: float | None = None      # llama3
    beta_fast: float | None = None             # yarn (default 32)
    beta_slow: float | None = None             # yarn (default 1)
    attention_factor: float | None = None      # yarn: cos/sin multiplier (default from factor)
    mscale: float | None = None                # yarn (DeepSeek style)
    mscale_all_dim: float | None = None        # yarn
    truncate: bool = True                      # yarn
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a supported MoE decoder. Expert projections are [moe_intermediate_size, hidden_size]
    in the channel-major layout (see docs/architecture.md)."""

    family: str                                # the config's model_type: mixtral qwen2_moe qwen3_moe olmoe
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool                       # renormalise the top-k softmax probabilities to sum to 1
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False                     # q/k/v projections carry a bias
    o_bias: bool = False                       # o projection carries a bias (OLMoE attention_bias)
    qk_norm: str | None = None                 # None, "head" (Qwen3: per head over head_dim), "full" (OLMoE)
    clip_qkv: float | None = None              # OLMoE: clamp q, k, v to [-clip, clip] after projection/norm
    shared_expert_intermediate_size: int = 0   # Qwen2-MoE shared expert (0 = none)
    shared_expert_gate: bool = False           # shared expert output scaled by sigmoid(x @ gate.T)
    sparse_layers: tuple[bool, ...] = ()       # per layer: MoE block (True) or dense MLP (False)
    dense_intermediate_size: int | None = None # intermediate size of the dense MLP layers
    router_scoring: str = "softmax"            # softmax over all experts, then top-k
    router_bias: bool = False                  # router (gate) linear has a bias
    sliding_window: int | None = None          # attention window (None: full causal)
    sliding_layers: tuple[bool, ...] = ()      # per layer: whether sliding_window applies
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # --- derived ---------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sparse(self, layer: int) -> bool:
        return self.sparse_layers[layer]

    @property
    def sparse_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.sparse_layers) if s)

    def expert_shape(self) -> tuple[int, int]:
        """Shape of every expert projection in the channel-major layout: (I, H)."""
        return (self.moe_intermediate_size, self.hidden_size)

    @property
    def num_expert_params(self) -> int:
        """Parameters in all routed experts together."""
        return len(self.sparse_layer_ids) * self.num_experts * 3 * self.moe_intermediate_size * self.hidden_size

    def sliding_window_for(self, layer: int) -> int | None:
        if self.sliding_window is None or not self.sliding_layers or not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["rope"] = RopeSpec(**d["rope"])
        for k in ("sparse_layers", "sliding_layers", "eos_token_ids"):
            d[k] = tuple(d.get(k) or ())
        return cls(**d)


# --- config.json helpers used by the adapters --------------------------------------------------------
def require(config: dict, key: str, family: str) -> Any:
    value = config.get(key)
    if value is None:
        raise UnsupportedModelError(f"{family} config.json lacks the required key {key!r}")
    return value


def rope_from_config(config: dict, default_theta: float) -> RopeSpec:
    """Read RoPE settings from either the v5 `rope_parameters` dict or v4 `rope_theta` + `rope_scaling`."""
    # transformers gives a v4 `rope_scaling` priority over `rope_parameters` when both are present
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", default_theta))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rtype!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if rtype in ("yarn", "llama3") and original is None:
        original = config.get("max_position_embeddings")

    def num(key: str) -> float | None:
        v = params.get(key)
        return None if v is None else float(v)

    spec = RopeSpec(
        type=rtype, theta=float(theta), factor=num("factor"),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=num("low_freq_factor"), high_freq_factor=num("high_freq_factor"),
        beta_fast=num("beta_fast"), beta_slow=num("beta_slow"), attention_factor=num("attention_factor"),
        mscale=num("mscale"), mscale_all_dim=num("mscale_all_dim"), truncate=bool(params.get("truncate", True)),
        partial_rotary_factor=float(params.get("partial_rotary_factor",
                                               config.get("partial_rotary_factor") or 1.0)),
    )
    if rtype in ("linear", "dynamic", "llama3") and spec.factor is None:
        raise UnsupportedModelError(f"rope type {rtype!r} needs a 'factor'")
    if rtype == "llama3" and (spec.low_freq_factor is None or spec.high_freq_factor is None):
        raise UnsupportedModelError("rope type 'llama3' needs 'low_freq_factor' and 'high_freq_factor'")
    return spec


def eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)


def common_fields(config: dict, family: str, *, default_theta: float) -> dict[str, Any]:
    """Fields shared by every family's config.json."""
    hidden = int(require(config, "hidden_size", family))
    heads = int(require(config, "num_attention_heads", family))
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{family}: hidden_act {act!r} is not supported (only 'silu')")
    layers = int(require(config, "num_hidden_layers", family))
    return dict(
        family=family,
        vocab_size=int(require(config, "vocab_size", family)),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        top_k=int(require(config, "num_experts_per_tok", family)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=rope_from_config(config, default_theta),
        max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config),
        hidden_act=act,
    )
