"""Low-rank residual `r{R}`: the best rank-R approximation of what the base codec got wrong.

With importance a (per input column) the fit minimises ||(E - U V) diag(sqrt(a))||_F: the SVD runs on
E * sqrt(a) and V is unscaled afterwards. Factors are fp16 and balanced (sqrt of the singular values on
each side) so neither overflows; decode adds lr_u @ lr_v in float32.
"""

from __future__ import annotations

import torch

__all__ = ["lr_part_specs", "encode_lowrank", "decode_lowrank", "truncated_svd"]

_OVERSAMPLE = 10
_POWER_ITERS = 4
_SEED = 0x6D6F65  # fixed: the randomised SVD must give the same bytes every run


def lr_part_specs(rank: int, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple]]:
    return [("lr_u", torch.float16, (rows, rank)), ("lr_v", torch.float16, (rank, cols))]


def encode_lowrank(
    residual: torch.Tensor, rank: int, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """residual [rows, cols] -> {lr_u fp16 [rows, R], lr_v fp16 [R, cols]}."""
    e = residual.detach().to("cpu", torch.float32)
    col = None
    if importance is not None:
        a = importance.detach().to("cpu", torch.float32)
        a = a / a.mean().clamp_min(1e-30) if a.max() > 0 else torch.ones_like(a)
        col = a.clamp_min(1e-4).sqrt()  # floor: unscaling V by 1/col must stay finite in fp16
        e = e * col  # [rows, cols]
    u, s, vh = truncated_svd(e, rank)  # [rows, R], [R], [R, cols]
    root = s.sqrt()
    lr_u = u * root  # [rows, R]
    lr_v = root[:, None] * vh  # [R, cols]
    if col is not None:
        lr_v = lr_v / col
    return {"lr_u": lr_u.half().contiguous(), "lr_v": lr_v.half().contiguous()}


def decode_lowrank(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return parts["lr_u"].float() @ parts["lr_v"].float()  # [rows, cols]


def truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of a [rows, cols] (float32). Exact for small matrices, otherwise a seeded
    randomised range finder with power iterations (Halko et al. 2011), deterministic."""
    rows, cols = a.shape
    k = rank + _OVERSAMPLE
    if 2 * k >= min(rows, cols) or min(rows, cols) <= 256:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    gen = torch.Generator().manual_seed(_SEED)
    omega = torch.randn(cols, k, generator=gen)  # [cols, k]
    q = torch.linalg.qr(a @ omega).Q  # [rows, k]
    for _ in range(_POWER_ITERS):  # re-orthonormalise each half step for stability
        q = torch.linalg.qr(a.T @ q).Q  # [cols, k]
        q = torch.linalg.qr(a @ q).Q  # [rows, k]
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)  # [k, k], [k], [k, cols]
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]
