"""Checkpoint generators for tests and benchmarks.

- `make_baby_checkpoint(family, path)`: a tiny random model of a supported family, built and saved by
  transformers itself (so tensor names, dtypes and config.json are exactly what real checkpoints use), plus a
  small deterministic BPE tokenizer.json. Seconds to build; used by the parity tests.
- `make_random_checkpoint(path, ...)`: a large Mixtral-layout checkpoint written tensor by tensor into
  safetensors shards without transformers, so peak RSS stays at one tensor; used for multi-GB benchmarks.
- `make_mixtral_width_checkpoint(path, ...)`: `make_random_checkpoint` at Mixtral-8x7B's real widths (or
  those widths divided by a power of two, to develop a benchmark fast) with few layers and a small vocabulary,
  so kernels and runtimes are timed at real expert sizes on a machine that cannot hold the real model."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

BABY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# A few lines of public-domain text (Shakespeare) for the tokenizer; fixed so the tokenizer is deterministic.
TOKENIZER_TEXT = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "Now is the winter of our discontent made glorious summer by this sun of York;",
    "All the world's a stage, and all the men and women merely players;",
    "They have their exits and their entrances, and one man in his time plays many parts.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "If music be the food of love, play on; give me excess of it, that, surfeiting,",
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath.",
    "We are such stuff as dreams are made on, and our little life is rounded with a sleep.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > # @ % & ! ? . , ; :",
]
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")   # ids 0, 1, 2


# --- tokenizer -------------------------------------------------------------------------------------
def make_tokenizer_json(path: str | Path, *, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on TOKENIZER_TEXT and save tokenizer.json (plus tokenizer_config.json).
    Byte-level, so any text encodes; ids < vocab_size; `<s>`=0, `</s>`=1, `<unk>`=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    out = path / "tokenizer.json"
    tok.save(str(out))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096,
    }, indent=2) + "\n")
    return out


# --- baby checkpoints (transformers) -----------------------------------------------------------------
_DEEPSEEK: dict[str, Any] = dict(
    intermediate_size=160, moe_intermediate_size=96, n_routed_experts=8, num_key_value_heads=4, kv_lora_rank=48,
    qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20, first_k_dense_replace=1, n_group=4, topk_group=2)
_YARN: dict[str, Any] = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32.0, beta_slow=1.0)


def baby_config(family: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of the transformers config class for a tiny model of `family`.
    hidden 128 (so group-128 quantisation works along hidden), 3 layers, 8 experts, top-2, I = 128 (DeepSeek:
    I = 96 and odd latent-attention widths)."""
    common: dict[str, Any] = dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    per_family: dict[str, dict[str, Any]] = {
        "mixtral": dict(intermediate_size=128, num_local_experts=8, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 1e6}),
        # layer 1 is a dense MLP (mlp_only_layers); every sparse layer has a gated shared expert
        "qwen2_moe": dict(intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                          num_experts=8, mlp_only_layers=[1], decoder_sparse_step=1, qkv_bias=True,
                          norm_topk_prob=False),
        "qwen3_moe": dict(intermediate_size=256, moe_intermediate_size=128, num_experts=8, head_dim=32,
                          norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1),
        "olmoe": dict(intermediate_size=128, num_experts=8, norm_topk_prob=False, clip_qkv=None),
        # MLA at odd widths, layer 0 dense, two shared experts, 4 groups of 2 experts with 2 groups eligible,
        # YaRN with mscale (as V2-Lite and V3 ship); V2 without q_lora_rank (as V2-Lite), V3 with it
        "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                            routed_scaling_factor=1.5, rope_parameters=dict(_YARN, mscale=0.707,
                                                                            mscale_all_dim=0.707)),
        "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=40, n_shared_experts=1, routed_scaling_factor=2.5,
                            norm_topk_prob=True, rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8)),
    }
    if family not in per_family:
        from moepack.errors import UnsupportedModelError
        raise UnsupportedModelError(f"no baby config for {family!r}; supported: {', '.join(BABY_FAMILIES)}")
    return {**common, **per_family[family], **overrides}


def _config_class(family: str):
    import transformers

    return {
        "mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig, "olmoe": transformers.OlmoeConfig,
        "deepseek_v2": transformers.DeepseekV2Config, "deepseek_v3": transformers.DeepseekV3Config,
    }[family]


def _randomise(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministic, non-trivial values for every parameter: weights N(0, std), norm weights 1 + N(0, 0.1),
    biases N(0, 0.1), so a forward that skips a norm weight or a bias cannot pass parity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias: a buffer, not a weight
                b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float32))


def make_baby_checkpoint(family: str, path: str | Path, *, seed: int = 0, dtype: str = "float32",
                         std: float = 0.05, **overrides: Any) -> Path:
    """Build a tiny random `family` model with transformers and save it (config.json, model.safetensors,
    tokenizer.json) to `path`. `overrides` are config fields (e.g. rope_parameters=..., tie_word_embeddings=True,
    num_hidden_layers=2). Deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    cfg_kwargs = baby_config(family, **overrides)
    config = _config_class(family)(**cfg_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, seed, std)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(_DTYPES[dtype]).eval()
    model.save_pretrained(path)
    make_tokenizer_json(path, vocab_size=min(512, config.vocab_size))
    return path


# --- large random checkpoints (no transformers) ------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    from moepack.units import parse_size

    return int(parse_size(size))


def mixtral_tensor_shapes(*, hidden: int, intermediate: int, layers: int, experts: int, heads: int,
                          kv_heads: int, vocab: int, tie: bool = False) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Mixtral checkpoint, in file order."""
    hd = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.self_attn.q_proj.weight", (heads * hd, hidden)
        yield f"{p}.self_attn.k_proj.weight", (kv_heads * hd, hidden)
        yield f"{p}.self_attn.v_proj.weight", (kv_heads * hd, hidden)
        yield f"{p}.self_attn.o_proj.weight", (hidden, heads * hd)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
        yield f"{p}.block_sparse_moe.gate.weight", (experts, hidden)
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            yield f"{q}.w1.weight", (intermediate, hidden)
            yield f"{q}.w2.weight", (hidden, intermediate)
            yield f"{q}.w3.weight", (intermediate, hidden)
    yield "model.norm.weight", (hidden,)
    if not tie:
        yield "lm_head.weight", (vocab, hidden)


def _random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype, std: float):
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    # fan-in scaled so activations keep a sane size through many layers; router a bit sharper
    scale = std if std > 0 else 1.0 / math.sqrt(shape[-1])
    if "block_sparse_moe.gate" in name:
        scale *= 4.0
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                       make: Any) -> None:
    """Write one safetensors file tensor by tensor: header from shapes first, then each tensor's bytes."""
    item = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = math.prod(shape) * item
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in entries:
            t = make(name, shape).contiguous()
            fh.write(t.view(torch.uint8).numpy().tobytes() if t.dim() else t.numpy().tobytes())
            del t
    tmp.replace(path)


def make_random_checkpoint(path: str | Path, *, hidden: int = 1024, intermediate: int = 2816, layers: int = 4,
                           experts: int = 8, top_k: int = 2, heads: int | None = None,
                           kv_heads: int | None = None, vocab: int = 32000, dtype: str = "bfloat16",
                           shard_size: int | str = "2GB", seed: int = 0, std: float = 0.0,
                           tie_word_embeddings: bool = False, rope_theta: float = 1e6,
                           tokenizer: bool = True) -> Path:
    """Write a random Mixtral-layout checkpoint (config.json, sharded model-*.safetensors with
    model.safetensors.index.json, tokenizer.json) without transformers. Tensors are generated one at a time
    (peak RSS about one tensor). `std=0` scales each weight by 1/sqrt(fan_in)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    heads = heads or max(1, hidden // 128)
    kv_heads = kv_heads or heads
    tdtype = _DTYPES[dtype]
    item = torch.empty((), dtype=tdtype).element_size()
    shapes = list(mixtral_tensor_shapes(hidden=hidden, intermediate=intermediate, layers=layers, experts=experts,
                                        heads=heads, kv_heads=kv_heads, vocab=vocab, tie=tie_word_embeddings))
    limit = _parse_size(shard_size)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        n = math.prod(shape) * item
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    g = torch.Generator().manual_seed(seed)

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _random_tensor(name, shape, g, tdtype, std)

    weight_map: dict[str, str] = {}
    total = 0
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(path / fname, entries, tdtype, make)
        for name, shape in entries:
            weight_map[name] = fname
            total += math.prod(shape) * item
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "num_local_experts": experts, "num_experts_per_tok": top_k, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": tie_word_embeddings, "sliding_window": None, "bos_token_id": 0, "eos_token_id": 1,
        "dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[tdtype],
        "router_jitter_noise": 0.0,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer:
        make_tokenizer_json(path, vocab_size=min(512, vocab))
    return path


# Mixtral-8x7B's widths (its config.json): every expert projection is 14336 x 4096.
MIXTRAL_8X7B = dict(hidden=4096, intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8, head_dim=128)


def mixtral_width_shape(divisor: int = 1) -> dict[str, int]:
    """Mixtral-8x7B's widths divided by `divisor` (1, 2, 4 or 8), keeping head_dim 128, the 4:1 grouping of
    query to key/value heads where it still divides, 8 experts and top-2. Every width stays a multiple of 256,
    so llama.cpp's k-quants and moepack's group-128 recipes apply to every expert matrix."""
    if divisor not in (1, 2, 4, 8):
        from moepack.errors import MoepackError
        raise MoepackError(f"mixtral-width divisor must be 1, 2, 4 or 8 (widths stay multiples of 256), got {divisor}")
    m = MIXTRAL_8X7B
    heads = m["heads"] // divisor
    return dict(hidden=m["hidden"] // divisor, intermediate=m["intermediate"] // divisor, experts=m["experts"],
                top_k=m["top_k"], heads=heads, kv_heads=max(1, heads // 4))


def make_mixtral_width_checkpoint(path: str | Path, *, divisor: int = 1, layers: int = 2, vocab: int = 512,
                                  dtype: str = "bfloat16", seed: int = 0, shard_size: int | str = "2GB") -> Path:
    """A random Mixtral checkpoint at Mixtral-8x7B's widths (hidden 4096, expert intermediate 14336, 8 experts
    top-2, 32 query / 8 key-value heads of 128) with `layers` layers and a `vocab`-token byte-level BPE
    tokenizer: at divisor 1 and 2 layers, 5.6 GB of bf16 experts. Written one tensor at a time into shards of
    `shard_size` (peak memory about one expert matrix, 0.24 GB in float32 at full width). Llama.cpp's converter
    reads it as a Mixtral with the gpt-2 pre-tokenizer (benchmarks/peers/gguf.py)."""
    shape = mixtral_width_shape(divisor)
    return make_random_checkpoint(path, hidden=shape["hidden"], intermediate=shape["intermediate"], layers=layers,
                                  experts=shape["experts"], top_k=shape["top_k"], heads=shape["heads"],
                                  kv_heads=shape["kv_heads"], vocab=vocab, dtype=dtype, shard_size=shard_size,
                                  seed=seed)


def main(argv: list[str] | None = None) -> None:
    """python -m moepack.testing.checkpoints FAMILY PATH [--seed N] [--dtype bf16]
    python -m moepack.testing.checkpoints random PATH --hidden 1024 --intermediate 2816 --layers 4 --experts 8
    python -m moepack.testing.checkpoints mixtral-width PATH [--divisor 1] [--layers 2] [--vocab 512]"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m moepack.testing.checkpoints", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=(*BABY_FAMILIES, "random", "mixtral-width"))
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="float32/bfloat16 (default: float32 baby, bfloat16 random)")
    for name, default in (("hidden", 1024), ("intermediate", 2816), ("layers", None), ("experts", 8),
                          ("top-k", 2), ("vocab", None)):
        ap.add_argument(f"--{name}", type=int, default=default,
                        help="random (layers 4, vocab 32000) or mixtral-width (layers 2, vocab 512)")
    ap.add_argument("--divisor", type=int, default=1, help="mixtral-width only: divide its widths by 2, 4 or 8")
    ap.add_argument("--shard-size", default="2GB", help="random and mixtral-width only")
    a = ap.parse_args(argv)
    if a.family == "mixtral-width":
        out = make_mixtral_width_checkpoint(a.path, divisor=a.divisor, layers=a.layers or 2, vocab=a.vocab or 512,
                                            dtype=a.dtype or "bfloat16", seed=a.seed, shard_size=a.shard_size)
    elif a.family == "random":
        out = make_random_checkpoint(a.path, hidden=a.hidden, intermediate=a.intermediate, layers=a.layers or 4,
                                     experts=a.experts, top_k=a.top_k, vocab=a.vocab or 32000,
                                     dtype=a.dtype or "bfloat16",
                                     shard_size=a.shard_size, seed=a.seed)
    else:
        out = make_baby_checkpoint(a.family, a.path, seed=a.seed, dtype=a.dtype or "float32")
    print(out)


if __name__ == "__main__":
    main()
