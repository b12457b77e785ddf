"""encode / decode / part_specs for a whole recipe: stages from the registry, in payload order."""

from __future__ import annotations

import torch

from moepack.codecs.recipe import PartSpec, Recipe, as_recipe
from moepack.codecs.registry import get_codec
from moepack.errors import CodecError

__all__ = ["part_specs", "encoded_nbytes", "encode", "decode", "sqnr_db"]


def part_specs(recipe: Recipe | str, shape: tuple[int, int]) -> list[PartSpec]:
    """Names, dtypes and shapes of the payload parts, in payload order, from recipe + shape alone."""
    r = as_recipe(recipe)
    rows, cols = r.validate_shape(tuple(shape))
    specs = []
    for cid in r.codec_ids:
        codec = get_codec(cid)
        stage_cols = r.stored_cols(cols) if codec.kind == "base" else cols
        specs += [PartSpec(n, d, tuple(s)) for n, d, s in codec.specs(r, rows, stage_cols)]
    return specs


def encoded_nbytes(recipe: Recipe | str, shape: tuple[int, int]) -> int:
    return sum(p.nbytes for p in part_specs(recipe, shape))


def encode(
    w: torch.Tensor, recipe: Recipe | str, *, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """w [rows, cols] -> parts (insertion order = payload order), each C-contiguous on the CPU.

    importance: optional [cols] non-negative weights of each input column's squared error
    (e.g. mean squared activation); every stage then minimises the activation-aware error.
    """
    r = as_recipe(recipe)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise CodecError(f"encode expects a floating-point tensor, got {type(w).__name__} {getattr(w, 'dtype', '')}")
    rows, cols = r.validate_shape(tuple(w.shape))
    w = w.detach().cpu()
    if not bool(torch.isfinite(w).all()):
        raise CodecError(f"encode ({r}): weights contain inf or nan")
    if importance is not None:
        importance = importance.detach().to("cpu", torch.float32)
        if importance.shape != (cols,):
            raise CodecError(f"encode ({r}): importance must have shape [{cols}], got {tuple(importance.shape)}")
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise CodecError(f"encode ({r}): importance must be finite and non-negative")
    parts: dict[str, torch.Tensor] = {}
    x, x_imp = w, importance
    if r.sparse:
        nm_parts, x, x_imp = get_codec("nm").encode(w, r, importance)
        parts.update(nm_parts)
    base = get_codec(r.codec_ids[1] if r.sparse else r.codec_ids[0])
    parts.update(base.encode(x, r, x_imp))
    if r.rank:
        residual = w.float() - _decode_base(parts, r, rows, cols)
        parts.update(get_codec("lr").encode(residual, r, importance))
    _check_parts(parts, r, (rows, cols))  # the contract: exactly part_specs, in order
    return parts


def decode(
    parts: dict[str, torch.Tensor], recipe: Recipe | str, shape: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The reference decode: parts -> w [rows, cols] in `dtype` (all arithmetic in float32)."""
    r = as_recipe(recipe)
    rows, cols = r.validate_shape(tuple(shape))
    _check_parts(parts, r, (rows, cols), ordered=False)
    w = _decode_base(parts, r, rows, cols)
    if r.rank:
        w = w + get_codec("lr").decode(parts, r, rows, cols)
    return w.to(dtype)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10*log10(|ref|^2 / |ref - approx|^2) in dB (inf if exact)."""
    ref = ref.detach().double()
    noise = (ref - approx.detach().double()).square().sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.square().sum() / noise))


def _decode_base(parts, r: Recipe, rows: int, cols: int) -> torch.Tensor:
    """Everything but the low-rank residual, float32 [rows, cols]."""
    base = get_codec(r.codec_ids[1] if r.sparse else r.codec_ids[0])
    kept = base.decode(parts, r, rows, r.stored_cols(cols))
    return get_codec("nm").decode(parts, r, rows, cols, kept) if r.sparse else kept


def _check_parts(parts, r: Recipe, shape: tuple[int, int], *, ordered: bool = True) -> None:
    specs = part_specs(r, shape)
    names = [p.name for p in specs]
    got = list(parts)
    if (got if ordered else sorted(got)) != (names if ordered else sorted(names)):
        raise CodecError(f"recipe {r} shape {shape}: expected parts {names}, got {got}")
    for p in specs:
        t = parts[p.name]
        if not isinstance(t, torch.Tensor) or t.dtype != p.dtype or tuple(t.shape) != p.shape:
            desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CodecError(f"recipe {r} shape {shape}: part {p.name!r} must be {p.dtype} {p.shape}, got {desc}")
