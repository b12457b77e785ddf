"""MXFP4 (OCP microscaling FP4) as GPT-OSS checkpoints store expert weights: a pure-torch, exact decoder.

A block of 32 consecutive weights along a row shares one e8m0 scale byte s (the power of two 2^(s - 127));
each weight is a 4-bit e2m1 code (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
their negatives), two codes a byte, the element at the even position in the low nibble. Stored as
`blocks` [..., G, 16] uint8 and `scales` [..., G] uint8; decoded rows are [..., G * 32].

Every decoded value is a code (at most 2 significant bits) times a power of two, so it is exact in float32
and, for scale bytes up to MAX_EXACT_SCALE, in bfloat16 as well (6 * 2^(s - 127) stays below bfloat16's
largest value; the smallest, 0.5 * 2^-127, is a bfloat16 subnormal). Larger scale bytes (255 is NaN in
the OCP format) are refused, never rounded."""

from __future__ import annotations

import torch

from moepack.errors import SourceError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32            # weights per scale
MAX_EXACT_SCALE = 252  # largest scale byte whose every value fits bfloat16 (6 * 2^125 < 2^127 * 1.99)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                 name: str = "MXFP4 tensor") -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G*32] in `dtype` (bfloat16 or float32, both
    exact). SourceError (naming `name`) for mismatched shapes or a scale byte above MAX_EXACT_SCALE."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise SourceError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise SourceError(f"{name}: MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)} "
                          f"(want blocks [..., G, {BLOCK // 2}] and scales [..., G])")
    if scales.numel() and int(scales.max()) > MAX_EXACT_SCALE:
        raise SourceError(f"{name}: MXFP4 scale byte {int(scales.max())} (2^{int(scales.max()) - 127}) is beyond "
                          f"{MAX_EXACT_SCALE}: its values do not fit bfloat16 (255 is NaN)")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]: low nibble first
    values = lut[codes].flatten(-2)  # [..., G, 32]
    scale = torch.exp2(scales.float() - 127.0)[..., None]  # [..., G, 1]: exact powers of two
    return (values * scale).flatten(-2).to(dtype)


def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16], scales [..., K/32]), rounding each weight to
    the nearest e2m1 code under its block's scale 2^(floor(log2 max|w|) - 2), the OCP rule (the largest
    lands in [4, 8) and is clipped to 6). The inverse of decode_mxfp4 on its own output; for tests and
    generated checkpoints (released checkpoints come quantised)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs rows that are a multiple of {BLOCK}, got {w.shape[-1]}")
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)  # [..., G, 32]
    amax = x.abs().amax(-1)  # [..., G]
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2, torch.zeros_like(amax))
    exp = exp.clamp(-127, MAX_EXACT_SCALE - 127)
    y = x / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES[:8], dtype=torch.float32)
    mag = (y.abs()[..., None] - lut).abs().argmin(-1)  # nearest magnitude code 0..7
    codes = (mag | ((y < 0) & (mag > 0)).long() << 3).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)
