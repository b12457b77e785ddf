"""Small hand-built packs for format tests (no checkpoint, no codec search: parts are given directly)."""

from __future__ import annotations

from pathlib import Path

import torch

from moepack.format import PackWriter

I, H = 8, 32  # noqa: E741 - channel-major expert projections [I, H]


def q4_parts(seed: int) -> dict[str, torch.Tensor]:
    """Deterministic q4g32 parts built by hand, independent of the codec's encoder."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (I, H * 4 // 8), generator=g, dtype=torch.uint8)
    scale = (torch.rand(I, H // 32, generator=g) * 0.1 + 0.01).to(torch.float16)
    zero = (torch.rand(I, H // 32, generator=g) * 15).to(torch.float16)
    return {"codes": codes, "scale": scale, "zero": zero}


def fp16_parts(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"values": torch.randn(I, H, generator=g).to(torch.float16)}


def build_tiny_pack(path: Path, *, shard_bytes: int = 1 << 20, layers: int = 2, experts: int = 2) -> Path:
    """A 2-layer, 2-expert pack: a few dense tensors, experts alternating fp16 and q4g32."""
    model = {"model_type": "mixtral", "family": "mixtral", "config": {"model_type": "mixtral"}}
    with PackWriter(path, model=model, source={"id": "tiny", "expert_bytes": 0, "dense_bytes": 0},
                    shard_bytes=shard_bytes, meta={"generator": "tests"}) as w:
        w.add_file("config.json", b'{"model_type": "mixtral"}\n')
        g = torch.Generator().manual_seed(0)
        w.add_tensor("model.embed_tokens.weight", torch.randn(16, H, generator=g).to(torch.bfloat16))
        w.add_tensor("model.norm.weight", torch.ones(H, dtype=torch.float32))
        for layer in range(layers):
            for e in range(experts):
                seed = layer * 100 + e * 10
                if e % 2 == 0:
                    projs = {p: ("fp16", (I, H), fp16_parts(seed + k)) for k, p in enumerate(("up", "gate", "down"))}
                else:
                    projs = {p: ("q4g32", (I, H), q4_parts(seed + k)) for k, p in enumerate(("up", "gate", "down"))}
                w.add_expert(layer, e, projs, source_bytes=3 * I * H * 2, frequency=0.5)
        w.finish()
    return path
