"""Little-endian bit packing shared by codecs and kernels.

A row of n codes of b bits is one bitstream: code c occupies stream bits [c*b, (c+1)*b) and stream
bit k is bit k % 8 of byte k // 8. So 4-bit codes put the first code in the low nibble, 2-bit codes
the first code in the lowest pair, and 3-bit codes fill 3 bytes per 8 codes. A stream whose length is
not a whole number of bytes is zero-padded to ceil(n*b/8) bytes.

Both directions work on 8 codes at a time: 8 codes of b <= 8 bits are exactly b bytes, so one int64
word per 8 codes holds them and shifts move between the two views without a per-bit loop.
"""

from __future__ import annotations

import torch

from moepack.errors import CodecError

__all__ = ["packed_nbytes", "pack_bits", "unpack_bits"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes used by n codes of `bits` bits: ceil(n * bits / 8)."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] (integers in [0, 2**bits)) -> packed uint8 [..., ceil(n*bits/8)]."""
    _check_bits(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    nbytes = packed_nbytes(n, bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    pad = (-n) % 8
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)  # [..., words, 8]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # [..., words, 1]; disjoint bits, so sum == or
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8)  # [..., words, bits]
    return out.reshape(*lead, -1)[..., :nbytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed uint8 [..., ceil(n*bits/8)] -> codes uint8 [..., n]."""
    _check_bits(bits)
    nbytes = packed_nbytes(n, bits)
    if packed.dtype != torch.uint8 or packed.shape[-1] != nbytes:
        raise CodecError(
            f"unpack_bits: expected uint8 [..., {nbytes}] for {n} codes of {bits} bits, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.contiguous()
    words = (n + 7) // 8
    p = packed.to(torch.int64)
    pad = words * bits - nbytes
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.reshape(*lead, words, bits)  # [..., words, bits]
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1, keepdim=True)  # [..., words, 1]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8)  # [..., words, 8]
    return codes.reshape(*lead, -1)[..., :n].contiguous()


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise CodecError(f"bit width must be an integer in 1..8, got {bits!r}")
