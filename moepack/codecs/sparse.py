"""N:M structured sparsity: in every block of M consecutive columns of a row keep N values.

A row of `cols` columns has cols // M full blocks and, when M does not divide cols, one short last
block of L = cols % M columns that keeps ceil(N*L/M) values (the same density, at least one).
`kept_count(n, m, cols)` is the number K of kept values per row. The kept values form a compacted
matrix [rows, K] (handed to the base codec), in column order; their in-block positions (ascending
within each block) are packed as ceil(log2 M)-bit codes into `nm_index` [rows, ceil(K*ceil(log2 M)/8)]
with the same little-endian bitstream as quant codes. Slot j of a row belongs to block j // N.

Positions are handled here as absolute column indices int64 [rows, K] (block * M + in-block offset).
"""

from __future__ import annotations

import torch

from moepack.codecs.bits import pack_bits, packed_nbytes, unpack_bits
from moepack.errors import CodecError

__all__ = ["index_bits", "kept_count", "nm_part_specs", "nm_select", "nm_compact", "nm_encode_index",
           "nm_positions", "nm_scatter"]


def index_bits(m: int) -> int:
    """ceil(log2 m): bits per in-block position."""
    return (m - 1).bit_length()


def tail_kept(n: int, m: int, cols: int) -> int:
    """Values kept in the short last block (0 when M divides cols): ceil(N * (cols % M) / M)."""
    return -(-n * (cols % m) // m)


def kept_count(n: int, m: int, cols: int) -> int:
    """Kept values per row: N per full block plus the short last block's share."""
    return cols // m * n + tail_kept(n, m, cols)


def nm_part_specs(n: int, m: int, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple]]:
    return [("nm_index", torch.uint8, (rows, packed_nbytes(kept_count(n, m, cols), index_bits(m))))]


def _block_starts(n: int, m: int, cols: int) -> torch.Tensor:
    """First column of the block of each kept slot: int64 [K]."""
    nb, nt = cols // m, tail_kept(n, m, cols)
    full = torch.arange(nb, dtype=torch.int64).repeat_interleave(n) * m
    return torch.cat([full, torch.full((nt,), nb * m, dtype=torch.int64)])


def _top_ascending(score: torch.Tensor, k: int) -> torch.Tensor:
    """In-block positions of the k largest scores along the last dim, ascending; ties to the lower position."""
    # a stable descending sort breaks ties by position (topk does not promise an order)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def nm_select(w: torch.Tensor, n: int, m: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Column indices of the kept values, ascending: int64 [rows, K].

    Keeps the N largest w^2 * importance per block (the squared error that dropping a value costs), and
    ceil(N*L/M) of the short last block of L columns; ties go to the lower position, so the choice is
    deterministic.
    """
    rows, cols = w.shape
    nb, nt = cols // m, tail_kept(n, m, cols)
    score = w.detach().float().square()
    if importance is not None:
        score = score * importance.detach().float().clamp_min(0)
    out = []
    if nb:
        pos = _top_ascending(score[:, : nb * m].reshape(rows, nb, m), n)  # [rows, nb, N]
        out.append((pos + torch.arange(nb, dtype=torch.int64).view(1, nb, 1) * m).reshape(rows, nb * n))
    if nt:
        out.append(_top_ascending(score[:, nb * m :], nt) + nb * m)  # [rows, nt]
    return torch.cat(out, dim=1)


def nm_compact(w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """w [rows, cols] + column indices [rows, K] -> kept values [rows, K] (same dtype)."""
    return torch.gather(w, 1, pos)


def nm_encode_index(pos: torch.Tensor, m: int) -> torch.Tensor:
    return pack_bits(pos % m, index_bits(m))


def nm_positions(index: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """nm_index uint8 [rows, bytes] -> column indices int64 [rows, K]; CodecError for an offset outside its
    block (>= M, or past the end of the short last block)."""
    k = kept_count(n, m, cols)
    off = unpack_bits(index, index_bits(m), k).to(torch.int64)  # [rows, K]
    pos = off + _block_starts(n, m, cols)
    if bool((off >= m).any()) or (k and bool((pos >= cols).any())):
        raise CodecError(f"nm_index holds a position outside its block (M={m}, cols={cols})")
    return pos


def nm_scatter(values: torch.Tensor, pos: torch.Tensor, cols: int) -> torch.Tensor:
    """Kept values [rows, K] -> dense [rows, cols] with zeros elsewhere."""
    out = torch.zeros(values.shape[0], cols, dtype=values.dtype)
    out.scatter_(1, pos, values)
    return out
