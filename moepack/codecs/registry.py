"""Stable codec ids (what the manifest stores) -> their reference implementations.

A recipe is a chain of stages in payload order: optional `nm`, one base (`raw` or `gq`), optional `lr`.
Each stage knows its parts from (recipe, rows, cols) alone; `cols` is what that stage sees (the
compacted width for a base behind `nm`). Stage kinds differ in how they compose:
  base     encode(w, recipe, importance) -> parts;        decode(parts, recipe, rows, cols) -> w
  wrap     encode(w, recipe, importance) -> (parts, kept, kept_importance);
           decode(parts, recipe, rows, cols, kept) -> w   (kept: the base's decoded compact matrix)
  residual encode(residual, recipe, importance) -> parts; decode(parts, recipe, rows, cols) -> delta
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moepack.codecs import lowrank, passthrough, quant, quantdq, sparse
from moepack.codecs.recipe import Recipe
from moepack.errors import CodecError

__all__ = ["Codec", "CODECS", "get_codec", "register"]


@dataclass(frozen=True)
class Codec:
    id: str
    kind: str  # "base" | "wrap" | "residual"
    summary: str
    specs: Callable[[Recipe, int, int], list[tuple[str, torch.dtype, tuple]]]
    encode: Callable
    decode: Callable


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.id in CODECS:
        raise CodecError(f"codec id {codec.id!r} is already registered")
    CODECS[codec.id] = codec
    return codec


def get_codec(codec_id: str) -> Codec:
    try:
        return CODECS[codec_id]
    except KeyError:
        raise CodecError(f"unknown codec id {codec_id!r}; known: {sorted(CODECS)}") from None


def _nm_encode(w: torch.Tensor, r: Recipe, importance: torch.Tensor | None):
    pos = sparse.nm_select(w, r.n, r.m, importance)  # [rows, K] column indices
    kept = sparse.nm_compact(w, pos)  # [rows, K]
    kept_imp = None
    if importance is not None:  # the base now sees a different column subset in every row
        full = importance.float().expand(w.shape[0], -1).contiguous()
        kept_imp = sparse.nm_compact(full, pos)
    return {"nm_index": sparse.nm_encode_index(pos, r.m)}, kept, kept_imp


def _nm_decode(parts, r: Recipe, rows: int, cols: int, kept: torch.Tensor) -> torch.Tensor:
    pos = sparse.nm_positions(parts["nm_index"], r.n, r.m, cols)
    return sparse.nm_scatter(kept, pos, cols)


register(Codec(
    "raw", "base", "passthrough bf16/fp16/fp32 `values`",
    specs=lambda r, rows, cols: passthrough.raw_part_specs(r.dtype, rows, cols),
    encode=lambda w, r, imp: passthrough.encode_raw(w, r.dtype),
    decode=lambda parts, r, rows, cols: passthrough.decode_raw(parts),
))
register(Codec(
    "gq", "base", "group-wise asymmetric INT2/3/4, optimised scale and zero",
    specs=lambda r, rows, cols: quant.quant_part_specs(r.bits, r.group, rows, cols),
    encode=lambda w, r, imp: quant.quantize(w, r.bits, r.group, importance=imp),
    decode=lambda parts, r, rows, cols: quant.dequantize(parts, r.bits, r.group, (rows, cols)),
))
register(Codec(
    "gqd", "base", "group-wise INT2/3/4 as gq, scale and zero as 8-bit codes under per-row fp16 factors",
    specs=lambda r, rows, cols: quantdq.dq_part_specs(r.bits, r.group, rows, cols),
    encode=lambda w, r, imp: quantdq.quantize_dq(w, r.bits, r.group, importance=imp),
    decode=lambda parts, r, rows, cols: quantdq.dequantize_dq(parts, r.bits, r.group, (rows, cols)),
))
register(Codec(
    "nm", "wrap", "N:M structured sparsity with packed in-block indices",
    specs=lambda r, rows, cols: sparse.nm_part_specs(r.n, r.m, rows, cols),
    encode=_nm_encode,
    decode=_nm_decode,
))
register(Codec(
    "lr", "residual", "fp16 low-rank residual lr_u @ lr_v",
    specs=lambda r, rows, cols: lowrank.lr_part_specs(r.rank, rows, cols),
    encode=lambda e, r, imp: lowrank.encode_lowrank(e, r.rank, imp),
    decode=lambda parts, r, rows, cols: lowrank.decode_lowrank(parts),
))
