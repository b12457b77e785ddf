"""N:M structured sparsity: in every block of M consecutive columns of a row keep N values.

The kept values form a compacted matrix [rows, cols*N/M] (handed to the base codec); their in-block
positions, ascending within each block, are packed as ceil(log2 M)-bit codes into `nm_index`
[rows, ceil((cols/M)*N*ceil(log2 M)/8)] with the same little-endian bitstream as quant codes.
"""

from __future__ import annotations

import torch

from moepack.codecs.bits import pack_bits, packed_nbytes, unpack_bits
from moepack.errors import CodecError

__all__ = ["index_bits", "nm_part_specs", "nm_select", "nm_compact", "nm_encode_index", "nm_positions", "nm_scatter"]


def index_bits(m: int) -> int:
    """ceil(log2 m): bits per in-block position."""
    return (m - 1).bit_length()


def nm_part_specs(n: int, m: int, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple]]:
    return [("nm_index", torch.uint8, (rows, packed_nbytes(cols // m * n, index_bits(m))))]


def nm_select(w: torch.Tensor, n: int, m: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """In-block positions of the kept values, ascending: int64 [rows, cols/M, N].

    Keeps the N largest w^2 * importance per block (the squared error that dropping a value costs);
    ties go to the lower position, so the choice is deterministic.
    """
    rows, cols = w.shape
    if cols % m:
        raise CodecError(f"N:M sparsity: M={m} must divide cols={cols}")
    score = w.detach().float().square()
    if importance is not None:
        score = score * importance.detach().float().clamp_min(0)
    score = score.reshape(rows, cols // m, m)  # [rows, nb, M]
    # a stable descending sort breaks ties by position (topk does not promise an order)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]
    return order.sort(dim=-1).values  # [rows, nb, N]


def nm_compact(w: torch.Tensor, pos: torch.Tensor, m: int) -> torch.Tensor:
    """w [rows, cols] + positions [rows, nb, N] -> kept values [rows, nb*N] (same dtype)."""
    rows, cols = w.shape
    return torch.gather(w.reshape(rows, cols // m, m), -1, pos).reshape(rows, -1)


def nm_encode_index(pos: torch.Tensor, m: int) -> torch.Tensor:
    rows = pos.shape[0]
    return pack_bits(pos.reshape(rows, -1), index_bits(m))


def nm_positions(index: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """nm_index uint8 -> positions int64 [rows, cols/M, N]."""
    rows = index.shape[0]
    pos = unpack_bits(index, index_bits(m), cols // m * n).to(torch.int64)
    pos = pos.reshape(rows, cols // m, n)
    if bool((pos >= m).any()):
        raise CodecError(f"nm_index holds a position >= M={m}")
    return pos


def nm_scatter(values: torch.Tensor, pos: torch.Tensor, m: int, cols: int) -> torch.Tensor:
    """Kept values [rows, nb*N] -> dense [rows, cols] with zeros elsewhere."""
    rows = values.shape[0]
    out = torch.zeros(rows, cols // m, m, dtype=values.dtype)
    out.scatter_(-1, pos, values.reshape(pos.shape))
    return out.reshape(rows, cols)
