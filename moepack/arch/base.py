"""The adapter base: tensor naming shared by the supported families (all use Llama-style attention).

Names are the on-disk Hugging Face names as transformers 5.24 `save_pretrained` writes them. Every supported
family but GPT-OSS stores experts per expert on disk (`...experts.N.<proj>.weight`), so `fused_experts` is
False; a family that stores `[E, ...]` tensors (GPT-OSS) sets it and returns refs with `index` and
`rows`/`cols` set (see ExpertTensorRef)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from moepack.arch.spec import ModelSpec

PROJS = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertTensorRef:
    """How to get one expert projection in the channel-major layout [I, H] out of a stored tensor:
    `t = stored[name]`; if `index` is not None: `t = t[index]`; if `scales` is not None, `t` holds MXFP4
    blocks [..., G, 16] and `stored[scales][index]` their e8m0 scales [..., G]: `t` becomes the decoded
    [..., G*32] matrix (moepack.source.mxfp4); if `rows` is not None: `t = t[rows[0]:rows[1]:step]`; if
    `cols` is not None: `t = t[:, cols[0]:cols[1]:cols[2]]`; if `transpose`: `t = t.T`. Use
    `extract(t, scales)` to apply it to loaded tensors (`local()`: the same ref for tensors already indexed,
    as `Checkpoint.read_ref` reads only the expert's slice of a fused [E, ...] tensor)."""

    name: str
    index: int | None = None
    rows: tuple[int, int] | None = None
    transpose: bool = False
    scales: str | None = None                  # MXFP4: the e8m0 scales tensor of the blocks in `name`
    step: int = 1                              # row step (interleaved gate/up: 2)
    cols: tuple[int, int, int] | None = None   # (start, stop, step) of columns

    def extract(self, t: Any, scales: Any = None) -> Any:
        if self.index is not None:
            t = t[self.index]
            scales = None if scales is None else scales[self.index]
        rows = slice(*self.rows, self.step) if self.rows is not None else slice(None)
        if self.scales is not None:
            from moepack.source.mxfp4 import decode_mxfp4  # torch: imported only where tensors are

            if scales is None:
                raise ValueError(f"{self.name} holds MXFP4 blocks: pass its scales tensor {self.scales!r}")
            t = decode_mxfp4(t[rows], scales[rows], name=self.name)  # rows of blocks = rows decoded: only those
        elif self.rows is not None:
            t = t[rows]
        if self.cols is not None:
            t = t[:, self.cols[0]:self.cols[1]:self.cols[2]]
        return t.T if self.transpose else t

    def local(self) -> ExpertTensorRef:
        """This ref for tensors already indexed (`stored[name][index]`)."""
        return replace(self, index=None)


class Adapter:
    """One model family. Unbound adapters (from `family(model_type)`) name experts and globals; naming a
    layer's dense tensors needs the spec (biases, shared expert, dense MLP layers): `bind(spec)`."""

    model_type: ClassVar[str] = ""
    fused_experts: ClassVar[bool] = False
    moe_prefix: ClassVar[str] = "mlp"                      # module holding router and experts
    router_name: ClassVar[str] = "gate"
    expert_proj_names: ClassVar[dict[str, str]] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    def __init__(self, spec: ModelSpec | None = None):
        self.spec = spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r}, bound={self.spec is not None})"

    def bind(self, spec: ModelSpec) -> Adapter:
        return type(self)(spec)

    # --- config ------------------------------------------------------------------------------------
    def spec_from_config(self, config: dict) -> ModelSpec:
        raise NotImplementedError

    # --- experts -----------------------------------------------------------------------------------
    def expert_tensor_name(self, layer: int, expert: int, proj: str) -> str:
        """On-disk name of the tensor holding `proj` (gate, up, down) of one expert."""
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}.{self._proj(proj)}.weight"

    def expert_tensor_ref(self, layer: int, expert: int, proj: str) -> ExpertTensorRef:
        """Where the channel-major [I, H] matrix of `proj` lives; per-expert families transpose `down` only
        (stored as w2 [H, I])."""
        return ExpertTensorRef(self.expert_tensor_name(layer, expert, proj), transpose=(proj == "down"))

    def expert_tensor_names(self, layer: int, expert: int) -> dict[str, str]:
        return {p: self.expert_tensor_name(layer, expert, p) for p in PROJS}

    def _proj(self, proj: str) -> str:
        try:
            return self.expert_proj_names[proj]
        except KeyError:
            raise ValueError(f"proj must be one of {PROJS}, got {proj!r}") from None

    # --- dense tensors -----------------------------------------------------------------------------
    def global_tensor_names(self) -> dict[str, str]:
        names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
        if self.spec is None or not self.spec.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names

    def layer_tensor_names(self, layer: int) -> dict[str, str]:
        """Dense tensors of one layer by role (see docs/architecture.md); roles a layer lacks are omitted."""
        spec = self._bound()
        if not 0 <= layer < spec.num_layers:
            raise IndexError(f"layer {layer} out of range (model has {spec.num_layers})")
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        names = {
            "input_norm": f"{p}.input_layernorm.weight",
            "post_attn_norm": f"{p}.post_attention_layernorm.weight",
            "q": f"{a}.q_proj.weight", "k": f"{a}.k_proj.weight", "v": f"{a}.v_proj.weight",
            "o": f"{a}.o_proj.weight",
        }
        if spec.qkv_bias:
            names.update(q_bias=f"{a}.q_proj.bias", k_bias=f"{a}.k_proj.bias", v_bias=f"{a}.v_proj.bias")
        if spec.o_bias:
            names["o_bias"] = f"{a}.o_proj.bias"
        if spec.qk_norm is not None:
            names.update(q_norm=f"{a}.q_norm.weight", k_norm=f"{a}.k_norm.weight")
        m = f"{p}.{self.moe_prefix}"
        if spec.is_sparse(layer):
            names["router"] = f"{m}.{self.router_name}.weight"
            if spec.router_bias:
                names["router_bias"] = f"{m}.{self.router_name}.bias"
            names.update(self._shared_names(m))
        else:
            names.update(mlp_gate=f"{m}.gate_proj.weight", mlp_up=f"{m}.up_proj.weight",
                         mlp_down=f"{m}.down_proj.weight")
        return names

    def _shared_names(self, moe: str) -> dict[str, str]:
        return {}

    def dense_tensor_names(self) -> list[str]:
        """Every non-expert tensor the forward reads, globals first."""
        spec = self._bound()
        names = list(self.global_tensor_names().values())
        for layer in range(spec.num_layers):
            names.extend(self.layer_tensor_names(layer).values())
        return names

    def all_expert_tensor_names(self) -> list[str]:
        spec = self._bound()
        return [self.expert_tensor_name(layer, e, p)
                for layer in spec.sparse_layer_ids for e in range(spec.num_experts) for p in PROJS]

    def _bound(self) -> ModelSpec:
        if self.spec is None:
            raise ValueError(f"{self.model_type} adapter is not bound to a ModelSpec: "
                             "use moepack.arch.adapter_for(config_or_spec) or adapter.bind(spec)")
        return self.spec
