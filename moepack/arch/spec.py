"""ModelSpec: everything the lean forward needs, normalised from a Hugging Face config.json.

Pure Python (no torch, no transformers), so the pack reader and the CLI can import it cheaply."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moepack.errors import ModelConfigError, UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Routed experts' nonlinearity between up/gate and down: silu(g) * u, or GPT-OSS's
# (clamp(u, -l, l) + 1) * g' * sigmoid(alpha * g') with g' = clamp(g, max=l)
EXPERT_ACTS = ("silu", "clamped_swiglu")


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
    router_scoring: str = "softmax"            # softmax over all experts, then top-k; "sigmoid" (DeepSeek-V3)
    router_bias: bool = False                  # router (gate) linear has a bias
    sliding_window: int | None = None          # attention window (None: full causal)
    sliding_layers: tuple[bool, ...] = ()      # per layer: whether sliding_window applies
    attention_sinks: bool = False              # GPT-OSS: a learned per-head logit in each softmax denominator
    expert_bias: bool = False                  # GPT-OSS: routed experts' gate/up/down carry biases (dense tensors)
    expert_act: str = "silu"                   # "silu" (SwiGLU) or "clamped_swiglu" (GPT-OSS, see EXPERT_ACTS)
    swiglu_limit: float | None = None          # clamped_swiglu: gate <= limit, -limit <= up <= limit
    swiglu_alpha: float = 1.702                # clamped_swiglu: gate * sigmoid(alpha * gate)
    # DeepSeek-V2/V3: multi-head latent attention (MLA) and grouped routing (arch/deepseek.py); kv_lora_rank
    # 0 means ordinary attention. Under MLA head_dim is qk_rope_head_dim and num_kv_heads is num_heads.
    kv_lora_rank: int = 0                      # width of the compressed KV latent (what the cache stores)
    q_lora_rank: int | None = None             # None: one q projection; else q_a -> RMSNorm -> q_b
    qk_nope_head_dim: int = 0                  # per-head query/key width without rotary
    qk_rope_head_dim: int = 0                  # rotary width; one rotary key shared by every head
    v_head_dim: int = 0                        # per-head value width
    rope_interleave: bool = False              # rotary over interleaved pairs (x0, x1), (x2, x3), ...
    n_group: int = 1                           # experts in n_group groups; topk_group are eligible per token
    topk_group: int = 1
    group_scoring: str | None = None           # None, "max" (V2 group_limited_greedy), "top2" (V3: best two)
    routed_scaling_factor: float = 1.0         # routed experts' weights multiplied by this
    score_correction_bias: bool = False        # V3: a per-expert bias added to the scores for selection only
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        """Refuse a spec the forward cannot run (ModelConfigError), so a damaged config fails at load."""
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "moe_intermediate_size", "num_experts", "top_k", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ModelConfigError(f"{self.family}: {name} must be a positive integer, got {value!r:.40}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"{self.family}: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                              f"{self.num_kv_heads}")
        if self.top_k > self.num_experts:
            raise ModelConfigError(f"{self.family}: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if not _finite(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ModelConfigError(f"{self.family}: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not _finite(self.rope.theta) or self.rope.theta <= 0:
            raise ModelConfigError(f"{self.family}: rope theta must be a positive number, got {self.rope.theta!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                     "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor"):
            value = getattr(self.rope, name)
            if value is not None and not _finite(value):
                raise ModelConfigError(f"{self.family}: rope {name} must be a finite number, got {value!r}")
        if not 0 < self.rope.partial_rotary_factor <= 1 or (self.head_dim * self.rope.partial_rotary_factor) % 2:
            raise ModelConfigError(f"{self.family}: partial_rotary_factor {self.rope.partial_rotary_factor} with head_dim "
                              f"{self.head_dim} does not give an even rotary dimension")
        if self.sparse_layers and len(self.sparse_layers) != self.num_layers:
            raise ModelConfigError(f"{self.family}: {len(self.sparse_layers)} layer kinds for {self.num_layers} layers")
        for name in ("shared_expert_intermediate_size",):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ModelConfigError(f"{self.family}: {name} must be a non-negative integer, got {value!r:.40}")
        if self.dense_intermediate_size is not None and (
                not _is_int(self.dense_intermediate_size) or self.dense_intermediate_size < 1):
            raise ModelConfigError(f"{self.family}: intermediate_size must be a positive integer, "
                              f"got {self.dense_intermediate_size!r:.40}")
        if self.clip_qkv is not None and (not _finite(self.clip_qkv) or self.clip_qkv <= 0):
            raise ModelConfigError(f"{self.family}: clip_qkv must be a positive number, got {self.clip_qkv!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ModelConfigError(f"{self.family}: sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.expert_act not in EXPERT_ACTS:
            raise ModelConfigError(f"{self.family}: expert activation {self.expert_act!r} is not one of {EXPERT_ACTS}")
        if self.expert_act == "clamped_swiglu" and not (
                _finite(self.swiglu_limit) and self.swiglu_limit > 0 and _finite(self.swiglu_alpha)):
            raise ModelConfigError(f"{self.family}: swiglu_limit must be a positive number and swiglu_alpha "
                                   f"finite, got {self.swiglu_limit!r}, {self.swiglu_alpha!r}")
        if self.kv_lora_rank or self.group_scoring is not None:
            self._check_deepseek()
        ids = ((self.bos_token_id,) if self.bos_token_id is not None else ()) + tuple(self.eos_token_ids)
        if not all(_is_int(i) and 0 <= i for i in ids):
            raise ModelConfigError(f"{self.family}: token ids must be non-negative integers, got {list(ids)[:8]}")

    def _check_deepseek(self) -> None:
        """MLA widths and grouped routing (ModelConfigError), for a spec read from config.json or a manifest."""
        mla = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if self.kv_lora_rank else ()
        for name in (*mla, "n_group", "topk_group"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ModelConfigError(f"{self.family}: {name} must be a positive integer, got {value!r:.40}")
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or self.q_lora_rank < 1):
            raise ModelConfigError(f"{self.family}: q_lora_rank must be null or a positive integer, "
                                   f"got {self.q_lora_rank!r:.40}")
        if self.kv_lora_rank and (self.qk_rope_head_dim % 2 or self.head_dim != self.qk_rope_head_dim):
            raise ModelConfigError(f"{self.family}: qk_rope_head_dim {self.qk_rope_head_dim} must be even and "
                                   f"equal head_dim ({self.head_dim})")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ModelConfigError(f"{self.family}: {self.num_experts} experts do not split into n_group "
                                   f"{self.n_group} groups with topk_group {self.topk_group} of them")
        if self.group_scoring not in (None, "max", "top2"):
            raise ModelConfigError(f"{self.family}: unknown group scoring {self.group_scoring!r}")
        if self.group_scoring == "top2" and self.num_experts // self.n_group < 2:
            raise ModelConfigError(f"{self.family}: group scoring by the best two needs >= 2 experts per group")
        if not _finite(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            raise ModelConfigError(f"{self.family}: routed_scaling_factor must be a positive number, "
                                   f"got {self.routed_scaling_factor!r:.40}")

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
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# config.json keys the adapters read as integers, with the largest value accepted (a bound far above any real
# model that keeps a damaged config from building million-entry layer tables before the shape checks run)
INT_KEYS = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 20, "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14, "head_dim": 1 << 16, "intermediate_size": 1 << 22,
    "moe_intermediate_size": 1 << 22, "num_experts": 1 << 16, "num_local_experts": 1 << 16,
    "num_experts_per_tok": 1 << 16, "max_position_embeddings": 1 << 40, "shared_expert_intermediate_size": 1 << 22,
    "decoder_sparse_step": 1 << 12, "sliding_window": 1 << 40, "max_window_layers": 1 << 12,
    "original_max_position_embeddings": 1 << 40, "bos_token_id": 1 << 24,
}
FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "clip_qkv")


def check_config_values(config: dict, family: str) -> None:
    """Types and ranges of the config.json values the adapters read (ModelConfigError), before any is used:
    a head_dim of 1.5 or a layer count of "3" is refused here instead of failing inside attention."""
    for key, limit in INT_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 128.0 from a hand-edited config is still 128
        if not _is_int(value) or not 0 <= value <= limit:
            raise ModelConfigError(f"{family} config.json: {key} must be an integer in [0, {limit}], got {value!r:.40}")
    for key in FLOAT_KEYS:
        value = config.get(key)
        if value is not None and not _finite(value):
            raise ModelConfigError(f"{family} config.json: {key} must be a finite number, got {value!r:.40}")
    eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(_is_int(i) and 0 <= i < 1 << 24 for i in eos) or len(eos) > 1024:
        raise ModelConfigError(f"{family} config.json: eos_token_id must be an id or a list of ids, got {eos!r:.60}")
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ModelConfigError(f"{family} config.json: {key} must be an object, got {value!r:.40}")
        for k, v in (value or {}).items():
            if k not in ("rope_type", "type", "truncate") and v is not None and not _finite(v):
                raise ModelConfigError(f"{family} config.json: {key}.{k} must be a finite number, got {v!r:.40}")
    for key in ("mlp_only_layers", "layer_types"):
        value = config.get(key)
        if value is not None and (not isinstance(value, list) or len(value) > INT_KEYS["num_hidden_layers"]):
            raise ModelConfigError(f"{family} config.json: {key} must be a list, got {value!r:.40}")
    if not all(_is_int(i) for i in config.get("mlp_only_layers") or []):
        raise ModelConfigError(f"{family} config.json: mlp_only_layers must list layer numbers")


def require(config: dict, key: str, family: str) -> Any:
    value = config.get(key)
    if value is None:
        raise UnsupportedModelError(f"{family} config.json lacks the required key {key!r}")
    return value


def rope_from_config(config: dict, default_theta: float) -> RopeSpec:
    """Read RoPE settings from either the v5 `rope_parameters` dict or v4 `rope_theta` + `rope_scaling`."""
    # transformers gives a v4 `rope_scaling` priority over `rope_parameters` when both are present
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"rope_scaling / rope_parameters must be an object, got {params!r:.40}")
    params = dict(params)
    theta = params.get("rope_theta")
    theta = config.get("rope_theta") if theta is None else theta
    theta = default_theta if theta is None else theta
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
        partial_rotary_factor=float(params.get("partial_rotary_factor") or
                                    config.get("partial_rotary_factor") or 1.0),
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
    check_config_values(config, family)
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
        rms_norm_eps=float(1e-6 if config.get("rms_norm_eps") is None else config["rms_norm_eps"]),
        rope=rope_from_config(config, default_theta),
        max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config),
        hidden_act=act,
    )
