"""Model families: Hugging Face config.json -> ModelSpec, and the on-disk tensor names of each family.

    spec = spec_from_config(json.load(open("config.json")))
    names = adapter_for(spec)              # a bound adapter
    names.expert_tensor_name(0, 3, "down") # 'model.layers.0.mlp.experts.3.down_proj.weight'
    names.layer_tensor_names(0)            # {'input_norm': ..., 'q': ..., 'router': ..., ...}

Pure Python: importing this package never imports torch or transformers."""

from __future__ import annotations

from moepack.arch.base import PROJS, Adapter, ExpertTensorRef
from moepack.arch.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from moepack.arch.gpt_oss import GptOssAdapter
from moepack.arch.mixtral import MixtralAdapter
from moepack.arch.olmoe import OlmoeAdapter
from moepack.arch.qwen2_moe import Qwen2MoeAdapter
from moepack.arch.qwen3_moe import Qwen3MoeAdapter
from moepack.arch.spec import ROPE_TYPES, ModelSpec, RopeSpec
from moepack.errors import UnsupportedModelError

ADAPTERS: dict[str, type[Adapter]] = {
    a.model_type: a for a in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter,
                              DeepseekV2Adapter, DeepseekV3Adapter, GptOssAdapter)
}
SUPPORTED = tuple(ADAPTERS)


def family(model_type: str) -> Adapter:
    """The (unbound) adapter of a model_type; UnsupportedModelError names the supported ones."""
    try:
        return ADAPTERS[model_type]()
    except (KeyError, TypeError):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family; supported: {', '.join(SUPPORTED)}"
        ) from None


def spec_from_config(config: dict) -> ModelSpec:
    """Normalise a Hugging Face config.json (as a dict) into a ModelSpec."""
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"config must be a dict parsed from config.json, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        raise UnsupportedModelError(f"config.json has no model_type; supported: {', '.join(SUPPORTED)}")
    return family(model_type).spec_from_config(config)


def adapter_for(config_or_spec: dict | ModelSpec) -> Adapter:
    """The adapter bound to a spec (built from the config when given a dict)."""
    spec = config_or_spec if isinstance(config_or_spec, ModelSpec) else spec_from_config(config_or_spec)
    return family(spec.family).bind(spec)


__all__ = [
    "ADAPTERS", "PROJS", "ROPE_TYPES", "SUPPORTED", "Adapter", "ExpertTensorRef", "ModelSpec", "RopeSpec",
    "UnsupportedModelError", "adapter_for", "family", "spec_from_config",
]
