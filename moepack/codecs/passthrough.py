"""Passthrough (`bf16` / `fp16` / `fp32`): the matrix stored as-is in the dtype; lossless for it."""

from __future__ import annotations

import torch

from moepack.codecs.recipe import DTYPES

__all__ = ["raw_part_specs", "encode_raw", "decode_raw"]


def raw_part_specs(dtype: str, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple]]:
    return [("values", DTYPES[dtype], (rows, cols))]


def encode_raw(w: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    return {"values": w.detach().to("cpu", DTYPES[dtype]).contiguous()}


def decode_raw(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return parts["values"].float()
