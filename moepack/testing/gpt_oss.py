"""Baby GPT-OSS checkpoints for tests: built and saved by transformers' own GptOssForCausalLM (so names,
dtypes and config.json are what real checkpoints use), optionally with the experts re-stored as MXFP4
blocks and scales the way the released openai/gpt-oss checkpoints hold them.

    make_gpt_oss_checkpoint(path)                 # bf16, odd widths, fused [E, ...] expert tensors
    make_gpt_oss_checkpoint(path, mxfp4=True)     # experts as *_blocks / *_scales (widths multiples of 32)

transformers cannot quantise to MXFP4 without its Triton kernels, so the experts are quantised here with
`moepack.source.mxfp4.encode_mxfp4` (round to the nearest e2m1 code under a per-32 power-of-two scale)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moepack.testing.checkpoints import _DTYPES, _randomise, make_tokenizer_json


def gpt_oss_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of transformers' GptOssConfig for a tiny model: odd widths (hidden 96, I = 40, q/k/v
    64/32/32 wide; hidden a multiple of 32 so the group quantisers apply along it), 3
    layers alternating sliding (window 5) and full attention, 6 experts, top-2, a swiglu_limit low enough
    that the clamp acts on random weights, yarn RoPE as the released models use."""
    cfg: dict[str, Any] = dict(
        vocab_size=512, hidden_size=96, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=5, swiglu_limit=0.5,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
    )
    return {**cfg, **overrides}


MXFP4_WIDTHS = dict(hidden_size=96, intermediate_size=64)  # multiples of the 32-weight MXFP4 block


def build_gpt_oss(*, seed: int = 0, std: float = 0.05, **overrides: Any) -> torch.nn.Module:
    """The random float32 transformers model (biases N(0, 0.1), sinks N(0, 1): large enough that a forward
    that drops either cannot pass parity)."""
    import transformers

    config = transformers.GptOssConfig(**gpt_oss_config(**overrides))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, seed, std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def quantise_experts_mxfp4(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Round every expert matrix of `model` to MXFP4 in place (so the model is then the exact dequantised
    reference) and return the blocks/scales tensors as the released checkpoints name and lay them out."""
    from moepack.source.mxfp4 import decode_mxfp4, encode_mxfp4

    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            blocks, scales = encode_mxfp4(p.transpose(1, 2))  # output-major [E, out, in]
            p.copy_(decode_mxfp4(blocks, scales, dtype=torch.float32).transpose(1, 2))
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
    return out


def make_gpt_oss_checkpoint(path: str | Path, *, seed: int = 0, dtype: str = "bfloat16", mxfp4: bool = False,
                            std: float = 0.05, **overrides: Any) -> Path:
    """Save a baby GPT-OSS checkpoint (config.json, model.safetensors, tokenizer.json) to `path`. With
    `mxfp4`, the experts are stored as MXFP4 blocks/scales (widths default to MXFP4_WIDTHS) and config.json
    says `quantization_config: {"quant_method": "mxfp4"}`; the other tensors are in `dtype`."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    if mxfp4:
        overrides = {**MXFP4_WIDTHS, **overrides}
    model = build_gpt_oss(seed=seed, std=std, **overrides)
    packed = quantise_experts_mxfp4(model) if mxfp4 else {}
    model.to(_DTYPES[dtype]).save_pretrained(path)
    if mxfp4:
        (file,) = sorted(path.glob("*.safetensors"))
        tensors = {k: v for k, v in load_file(str(file)).items()
                   if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        save_file({**tensors, **packed}, str(file), metadata={"format": "pt"})
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    make_tokenizer_json(path, vocab_size=min(512, model.config.vocab_size))
    return path
