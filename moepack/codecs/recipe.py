"""Recipe strings: `[N:M+]base[+rR]` where base is `q{bits}g{group}`, `q{bits}g{group}d` (the same codes with
double-quantised metadata: 8-bit scale and zero codes per group under per-row fp16 factors) or a dtype
(`bf16`/`fp16`/`fp32`).

The Recipe is the parsed, validated, frozen form; `str(recipe)` is the canonical string the manifest
stores, and `parse_recipe(str(r)) == r` always holds.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from moepack.errors import CodecError

__all__ = ["Recipe", "PartSpec", "parse_recipe", "as_recipe", "BITS", "GROUPS", "DTYPES"]

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_M = 16  # N:M block size limit: indices stay <= 4 bits

_NM = re.compile(r"^(\d+):(\d+)$")
_Q = re.compile(r"^q(\d+)g(\d+)(d?)$")
_R = re.compile(r"^r(\d+)$")


@dataclass(frozen=True)
class PartSpec:
    """One payload tensor of an encoded matrix: name, dtype and shape, known from recipe + shape alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe. Exactly one of (bits, group) or dtype is set; n, m both set or both None."""

    bits: int | None = None
    group: int | None = None
    dtype: str | None = None  # passthrough base: a key of DTYPES
    n: int | None = None  # N:M sparsity, keep n of every m
    m: int | None = None
    rank: int = 0  # low-rank residual rank, 0 = none
    dq: bool = False  # double-quantised group metadata (`q{b}g{G}d`, codec `gqd`)

    def __post_init__(self) -> None:
        if (self.bits is None) != (self.group is None):
            raise CodecError(f"recipe needs both bits and group, got bits={self.bits} group={self.group}")
        if (self.bits is None) == (self.dtype is None):
            raise CodecError("recipe needs exactly one base: q{bits}g{group} or a dtype (bf16/fp16/fp32)")
        if self.bits is not None and self.bits not in BITS:
            raise CodecError(f"quant bits must be one of {BITS}, got {self.bits}")
        if self.group is not None and self.group not in GROUPS:
            raise CodecError(f"quant group must be one of {GROUPS}, got {self.group}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise CodecError(f"passthrough dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if (self.n is None) != (self.m is None):
            raise CodecError("N:M sparsity needs both N and M")
        if self.m is not None and not (2 <= self.m <= MAX_M and 1 <= self.n < self.m):
            raise CodecError(f"N:M sparsity needs 2 <= M <= {MAX_M} and 1 <= N < M, got {self.n}:{self.m}")
        if self.dq and self.bits is None:
            raise CodecError("double-quantised metadata (`d`) needs a q{bits}g{group} base")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise CodecError(f"low-rank rank must be a non-negative integer, got {self.rank!r}")

    # --- structure -----------------------------------------------------------------------------
    @property
    def sparse(self) -> bool:
        return self.m is not None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def index_bits(self) -> int:
        """Bits per kept-position index: ceil(log2 M)."""
        return (self.m - 1).bit_length() if self.m else 0

    @property
    def codec_ids(self) -> tuple[str, ...]:
        """Registry ids of the stages, in payload order (what the manifest may store)."""
        ids = ["nm"] if self.sparse else []
        ids.append(("gqd" if self.dq else "gq") if self.quantized else "raw")
        if self.rank:
            ids.append("lr")
        return tuple(ids)

    def stored_cols(self, cols: int) -> int:
        """Columns of the matrix the base codec sees: the kept values per row after N:M compaction
        (N per block of M, and ceil(N*L/M) of a short last block of L columns), else cols."""
        if not self.sparse:
            return cols
        from moepack.codecs.sparse import kept_count

        return kept_count(self.n, self.m, cols)

    def groups(self, cols: int) -> int:
        """Quantisation groups per row, the last one ragged when G does not divide the stored columns."""
        return -(-self.stored_cols(cols) // self.group)

    def validate_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Return (rows, cols) or raise CodecError naming the constraint the shape breaks. Any row length
        is accepted (format version 2: ragged last group, short last N:M block)."""
        if len(shape) != 2 or any(not isinstance(d, int) or d <= 0 for d in shape):
            raise CodecError(f"recipe {self}: expected a 2-D shape of positive ints, got {tuple(shape)}")
        rows, cols = shape
        if self.rank > min(rows, cols):
            raise CodecError(f"recipe {self}: rank {self.rank} exceeds min(rows, cols) = {min(rows, cols)}")
        return rows, cols

    def divides(self, cols: int) -> bool:
        """True when the shape needs no ragged group or short block (all a version-1 pack may hold)."""
        if self.sparse and cols % self.m:
            return False
        return not self.quantized or self.stored_cols(cols) % self.group == 0

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Stored bits per original weight, all parts included."""
        from moepack.codecs.pipeline import encoded_nbytes

        rows, cols = self.validate_shape(tuple(shape))
        return encoded_nbytes(self, (rows, cols)) * 8 / (rows * cols)

    def __str__(self) -> str:
        parts = [f"{self.n}:{self.m}"] if self.sparse else []
        parts.append(f"q{self.bits}g{self.group}{'d' if self.dq else ''}" if self.quantized else str(self.dtype))
        if self.rank:
            parts.append(f"r{self.rank}")
        return "+".join(parts)


def parse_recipe(s: str) -> Recipe:
    """'2:4+q4g64+r16' -> Recipe. Case and spaces are ignored; CodecError on anything else."""
    if isinstance(s, Recipe):
        return s
    if not isinstance(s, str) or not s.strip():
        raise CodecError(f"recipe must be a non-empty string, got {s!r}")
    comps = [c.strip() for c in s.strip().lower().split("+")]
    kw: dict = {}
    i = 0
    if i < len(comps) and (mt := _NM.match(comps[i])):
        kw["n"], kw["m"] = int(mt.group(1)), int(mt.group(2))
        i += 1
    if i >= len(comps):
        raise CodecError(f"recipe {s!r}: missing base (q{{bits}}g{{group}} or bf16/fp16/fp32)")
    if mt := _Q.match(comps[i]):
        kw["bits"], kw["group"], kw["dq"] = int(mt.group(1)), int(mt.group(2)), mt.group(3) == "d"
    elif comps[i] in DTYPES:
        kw["dtype"] = comps[i]
    else:
        raise CodecError(
            f"recipe {s!r}: component {comps[i]!r} is not a base; expected q{{bits}}g{{group}}[d] "
            f"(bits {BITS}, group {GROUPS}) or one of {tuple(DTYPES)}, after an optional N:M"
        )
    i += 1
    if i < len(comps) and (mt := _R.match(comps[i])):
        kw["rank"] = int(mt.group(1))
        if kw["rank"] == 0:
            raise CodecError(f"recipe {s!r}: low-rank rank must be >= 1")
        i += 1
    if i != len(comps):
        raise CodecError(f"recipe {s!r}: unexpected component {comps[i]!r}; order is [N:M+]base[+rR]")
    return Recipe(**kw)


@functools.lru_cache(maxsize=256)
def _parse_cached(s: str) -> Recipe:
    return parse_recipe(s)


def as_recipe(recipe: Recipe | str) -> Recipe:
    """A Recipe as is, or a recipe string parsed (cached: the runtime names recipes on every product)."""
    if isinstance(recipe, Recipe):
        return recipe
    return _parse_cached(recipe) if isinstance(recipe, str) else parse_recipe(recipe)
