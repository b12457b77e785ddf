"""Building blocks of the lean forward: RMSNorm, rotary embeddings (transformers' formulas), attention.

Only torch and moepack.arch. Shapes: B batch, T new tokens, S cached + new tokens, nh / nkv heads, d head_dim."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moepack.arch import ModelSpec, RopeSpec
from moepack.errors import UnsupportedModelError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, then scale (in float32 torch's fused op, which
    computes the same numbers in one call)."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


# --- rotary embeddings ---------------------------------------------------------------------------
def rope_inv_freq(rope: RopeSpec, head_dim: int, max_position_embeddings: int,
                  seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] float32, attention_scaling) as transformers' ROPE_INIT_FUNCTIONS compute them.
    `seq_len` matters only for "dynamic" (the longest sequence seen so far)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    base = rope.theta
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope.type == "default":
        return 1.0 / (base ** exps), 1.0
    if rope.type == "linear":
        return (1.0 / (base ** exps)) / rope.factor, 1.0
    if rope.type == "dynamic":
        seq = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((rope.factor * seq / max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exps), 1.0
    if rope.type == "llama3":
        return _llama3_inv_freq(rope, 1.0 / (base ** exps)), 1.0
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, dim, max_position_embeddings)
    raise UnsupportedModelError(f"rope type {rope.type!r} is not supported")


def _llama3_inv_freq(rope: RopeSpec, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def _yarn_inv_freq(rope: RopeSpec, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    original = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, dim] for integer positions [T] (float32 math, then cast, as transformers does)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [.., r] with its first half negated: rotate_half(x) * sin == x.roll(r/2) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ssin: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, n, T, d]; cos/sin [T, r] with r <= d (partial rotary: the first r dims rotate). `ssin`:
    signed_sin(sin), when the caller has it (full rotary then takes four ops, the same numbers)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        if ssin is not None:
            return x * cos + x.roll(r // 2, -1) * ssin
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


# --- attention -----------------------------------------------------------------------------------
def attention_mask(q_start: int, t: int, s: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [t, s] (True = attend) for queries at positions q_start..q_start+t-1 over keys 0..s-1;
    None when every query sees every key (single-token decode without a window)."""
    if t == 1 and (window is None or s <= window):
        return None
    q = torch.arange(q_start, q_start + t, device=device)[:, None]
    k = torch.arange(s, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """Grouped-query attention. q [B, nh, T, d], k/v [B, nkv, S, d] -> [B, T, nh*d]."""
    b, nh, t, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=nh != k.shape[1])  # [B, nh, T, d]
    return out.transpose(1, 2).reshape(b, t, nh * d)


def attend_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 sinks: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention whose softmax denominator also holds a learned logit per head (GPT-OSS's
    attention sinks; the sink has no value, so a head may attend to nothing). q [B, nh, T, d], k/v
    [B, nkv, S, d], sinks [nh] -> [B, T, nh*d]. Written out (SDPA has no sink term), as transformers'
    eager attention computes it: scores, the sink column, max subtracted, softmax, the sink dropped."""
    b, nh, t, d = q.shape
    rep = nh // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, nh, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, nh, 1, 1).expand(b, nh, t, 1)
    logits = torch.cat((scores, sink), dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    out = probs.to(v.dtype) @ v  # [B, nh, T, d]
    return out.transpose(1, 2).reshape(b, t, nh * d)


# --- KV cache ------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer, preallocated for `capacity` tokens (grows by doubling if exceeded).
    k/v of layer l: [B, n_kv_heads, capacity, head_dim]; `length` tokens are valid."""

    def __init__(self, spec: ModelSpec, *, capacity: int = 256, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.spec, self.batch, self.dtype, self.device = spec, batch, dtype, torch.device(device)
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        self.length = 0

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype: torch.dtype = torch.float32, batch: int = 1) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * batch * spec.num_kv_heads * spec.head_dim * item

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget every token from `length` on."""
        self.length = min(self.length, length)

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self.capacity)
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                new = t.new_zeros((*t.shape[:2], cap, t.shape[3]))
                new[:, :, : self.length] = t[:, :, : self.length]
                lst[i] = new

    def reserve(self, end: int) -> None:
        """Make room for positions up to `end` (exclusive), growing every layer's buffers if needed."""
        if end > self.capacity:
            self._grow(end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, nkv, T, d] at positions length..length+T-1; return all valid k/v of the layer.
        `length` advances only through `advance` (once per forward, after the last layer)."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        kc, vc = self.k[layer], self.v[layer]
        kc.narrow(2, self.length, end - self.length).copy_(k)
        vc.narrow(2, self.length, end - self.length).copy_(v)
        return kc.narrow(2, 0, end), vc.narrow(2, 0, end)

    def advance(self, t: int) -> None:
        self.length += t
