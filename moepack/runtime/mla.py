"""Multi-head latent attention (DeepSeek-V2/V3) over a cache of compressed latents.

Per token MLA computes a latent c = RMSNorm(x W_dkv) of kv_lora_rank r and one rotary key k_pe of
qk_rope_head_dim shared by every head; head h's key is [c W_uk_h | k_pe] and its value c W_uv_h, with
W_uk_h [dn, r] and W_uv_h [dv, r] the rows of kv_b_proj. The cache (`LatentCache`) holds [c | k_pe] per token
and layer, r + dr numbers, never the expanded keys and values (which are heads x (dn + dr + dv)).

The up-projections are absorbed rather than expanded per step: q_nope_h . (c W_uk_h) = (q_nope_h W_uk_h^T) . c,
so each head's query is moved into latent space once (q_lat_h [r]) and attends directly over the cached
[c | k_pe] with the query [q_lat_h | q_pe_h]; the attention output stays a latent per head (a weighted sum of c)
and W_uv_h maps it to the head's value width afterwards. One key/value "head" then serves every query head:
the heads are folded into the query length, so a decode step is one product over the cache per layer, and
nothing scales with the context but the cache itself. The numbers are transformers' (which expands) up to
float reassociation; tests/test_deepseek.py holds them to float tolerance and greedy tokens exactly.

Only torch and the runtime's layers; the model (runtime/model.py) calls `MlaAttention.forward` from
`attention()` when the spec has a kv_lora_rank."""

from __future__ import annotations

import math
from time import perf_counter
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moepack.arch import ModelSpec
from moepack.runtime.layers import KVCache, apply_rope, attention_mask, rms_norm
from moepack.runtime.prepared import CLOCK

if TYPE_CHECKING:
    from moepack.runtime.model import MoeModel, Segment


def mla_scale(spec: ModelSpec) -> float:
    """Softmax scale: (qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under a scaled RoPE
    (transformers' `yarn_apply_mscale`: YaRN's correction of the rotary dims applied to all of q . k)."""
    scale = (spec.qk_nope_head_dim + spec.qk_rope_head_dim) ** -0.5
    rope = spec.rope
    if rope.type != "default" and rope.mscale_all_dim and rope.factor and rope.factor > 1:
        m = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= m * m
    return scale


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rotary over interleaved pairs (x0, x1), (x2, x3), ...; x [.., d], cos/sin [.., d] as
    cat(freqs, freqs). The result is laid out de-interleaved (evens' rotations, then odds'), as transformers'
    V3 does; V2 keeps the pairs interleaved, which permutes q and k alike and leaves q . k unchanged."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class LatentCache(KVCache):
    """MLA's cache: per layer [B, 1, capacity, kv_lora_rank + qk_rope_head_dim] (the normed latent, then the
    rotated shared key); `length` tokens valid. Grows, crops and resets like KVCache."""

    def __init__(self, spec: ModelSpec, *, capacity: int = 256, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.spec, self.batch, self.dtype, self.device = spec, batch, dtype, torch.device(device)
        shape = (batch, 1, capacity, spec.kv_lora_rank + spec.qk_rope_head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        self.v: list[torch.Tensor] = []
        self.length = 0

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype: torch.dtype = torch.float32, batch: int = 1) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return spec.num_layers * batch * (spec.kv_lora_rank + spec.qk_rope_head_dim) * item

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Store [c | k_pe] rows [B, 1, T, r + dr] at length..length+T-1; return the layer's valid rows."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        kc = self.k[layer]
        kc.narrow(2, self.length, end - self.length).copy_(k)
        return kc.narrow(2, 0, end), None


def cache_class(spec: ModelSpec) -> type[KVCache]:
    """The KV cache a family's attention fills: the latent one under MLA."""
    return LatentCache if spec.kv_lora_rank else KVCache


class MlaAttention:
    """The MLA block of every layer of one model. Built after the model's dense ops: it takes the fused
    [q | kv_a] op ("q_kv_a": q_proj or q_a_proj beside kv_a_proj_with_mqa, one product), "q_b" and "o" from
    `model.ops`, and holds kv_b_proj in the compute dtype as per-head W_uk [nh, dn, r] and W_uv^T [nh, r, dv]
    views (the model's weight entry is replaced by that copy, which the budget counts at that width)."""

    def __init__(self, model: MoeModel):
        spec = self.spec = model.spec
        self.model = model
        self.nh, self.r, self.dr = spec.num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
        self.dn, self.dv = spec.qk_nope_head_dim, spec.v_head_dim
        self.q_width = spec.q_lora_rank or self.nh * (self.dn + self.dr)
        self.scale = mla_scale(spec)
        self.w_uk: list[torch.Tensor | None] = []
        self.w_uv: list[torch.Tensor | None] = []
        for n in model.layers:
            kv_b = model.w[n["kv_b"]].to(model.dtype).contiguous()
            model.w[n["kv_b"]] = kv_b
            w = kv_b.view(self.nh, self.dn + self.dv, self.r)
            self.w_uk.append(w[:, : self.dn])  # [nh, dn, r]
            self.w_uv.append(w[:, self.dn:].transpose(1, 2))  # [nh, r, dv]

    def forward(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, ...],
                segments: list[Segment]) -> torch.Tensor:
        """x [N, H] (normed) -> attention output [N, H]; rope = (cos, sin, signed sin) [N, 1, dr] per row."""
        model, spec = self.model, self.spec
        ops, n, w = model.ops[layer], model.layers[layer], model.w
        nh, r, dr, dn = self.nh, self.r, self.dr, self.dn
        q, latent, k_pe = ops["q_kv_a"](x).split((self.q_width, r, dr), dim=-1)
        if spec.q_lora_rank is not None:
            q = ops["q_b"](rms_norm(q, w[n["q_a_norm"]], spec.rms_norm_eps))
        q = q.view(-1, nh, dn + dr)  # [N, nh, dn + dr]
        latent = rms_norm(latent, w[n["kv_a_norm"]], spec.rms_norm_eps)  # [N, r]
        pe = torch.cat((q[..., dn:], k_pe[:, None]), dim=1)  # [N, nh + 1, dr]: q heads, then the shared key
        pe = rope_interleaved(pe, rope[0], rope[1]) if spec.rope_interleave else apply_rope(pe, *rope)
        q_lat = torch.bmm(q[..., :dn].transpose(0, 1), self.w_uk[layer])  # [nh, N, r]
        query = torch.cat((q_lat, pe[:, :nh].transpose(0, 1)), dim=-1)[None]  # [1, nh, N, r + dr]
        keys = torch.cat((latent, pe[:, nh]), dim=-1)[None, None]  # [1, 1, N, r + dr]
        outs, row = [], 0
        for seg in segments:
            a, row = row, row + seg.tokens
            qs, ks = (query, keys) if len(segments) == 1 else (query[:, :, a:row], keys[:, :, a:row])
            if seg.rows > 1:  # [1, h, b*t, D] -> [b, h, t, D]
                qs, ks = (z[0].reshape(z.shape[1], seg.rows, seg.t, -1).transpose(0, 1) for z in (qs, ks))
            if seg.cache is not None:
                ks, _ = seg.cache.update(layer, ks)
            outs.append(self._attend(qs, ks, attention_mask(seg.start, seg.t, ks.shape[2], None, x.device)))
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [nh, N, r]
        o = torch.bmm(o, self.w_uv[layer]).transpose(0, 1).reshape(-1, nh * self.dv)  # [N, nh * dv]
        return ops["o"](o)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [b, nh, t, r + dr] over the cached [c | k_pe] rows kv [b, 1, S, r + dr] -> latent outputs
        [nh, b*t, r]. The heads share the one key/value head, so they are folded into the query length."""
        b, nh, t, d = q.shape
        if mask is not None:
            mask = mask.repeat(nh, 1)  # [nh*t, S]
        t0 = perf_counter()
        o = F.scaled_dot_product_attention(q.reshape(b, 1, nh * t, d), kv, kv[..., : self.r], attn_mask=mask,
                                           scale=self.scale)  # [b, 1, nh*t, r]
        CLOCK.s += perf_counter() - t0
        return o.reshape(b, nh, t, self.r).transpose(0, 1).reshape(nh, b * t, self.r)
