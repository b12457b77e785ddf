"""Manifest records: plain dataclasses with strict JSON (de)serialisation shared by writer and reader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from math import prod
from typing import Any

from moepack.errors import ManifestError, OutOfRangeError
from moepack.format.constants import DTYPES, MAX_OFFSET


def _get(obj: dict, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = obj[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ManifestError(f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}, got {value!r:.60}")
    return value


def _size(obj: dict, key: str, where: str) -> int:
    value = _get(obj, key, int, where)
    if not 0 <= value <= MAX_OFFSET:
        raise OutOfRangeError(f"{where}: {key}={value} is outside [0, {MAX_OFFSET}]")
    return value


def _shape(obj: dict, where: str) -> tuple[int, ...]:
    shape = _get(obj, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_OFFSET for d in shape):
        raise ManifestError(f"{where}: bad shape {shape!r:.80}")
    return tuple(shape)


def _dtype(obj: dict, where: str) -> str:
    dtype = _get(obj, "dtype", str, where)
    if dtype not in DTYPES:
        raise ManifestError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return dtype


def _number(obj: dict, key: str, where: str) -> float | None:
    """An optional finite number (JSON has no NaN; a huge integer would overflow later arithmetic)."""
    value = obj.get(key)
    if value is None:
        return None
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        ok = False
    if not ok:
        raise ManifestError(f"{where}: {key} should be a finite number, got {value!r:.60}")
    return float(value)


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return prod(shape) * DTYPES[dtype].itemsize


@dataclass(frozen=True)
class PartRecord:
    """One payload array inside an expert blob; `offset` is relative to the blob start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> PartRecord:
        return cls(_get(obj, "name", str, where), _dtype(obj, where), _shape(obj, where),
                   _size(obj, "offset", where), _size(obj, "nbytes", where))


@dataclass(frozen=True)
class ProjectionRecord:
    """One projection of an expert: its recipe, logical shape [I, H] (channel-major), and payload parts."""

    recipe: str
    shape: tuple[int, int]
    parts: tuple[PartRecord, ...]
    error: float | None = None  # relative output error measured at compress time, if any

    def to_json(self) -> dict:
        out: dict[str, Any] = {"recipe": self.recipe, "shape": list(self.shape), "parts": [p.to_json() for p in self.parts]}
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str) -> ProjectionRecord:
        shape = _shape(obj, where)
        if len(shape) != 2:
            raise ManifestError(f"{where}: a projection shape must be 2-D, got {list(shape)}")
        parts = tuple(PartRecord.from_json(p, f"{where} part {i}") for i, p in enumerate(_get(obj, "parts", list, where)))
        error = _number(obj, "error", where)
        return cls(_get(obj, "recipe", str, where), (shape[0], shape[1]), parts, error)


@dataclass(frozen=True)
class ExpertRecord:
    layer: int
    expert: int
    shard: int
    offset: int
    nbytes: int
    checksum: str
    source_bytes: int  # bytes of this expert's three projections in the source checkpoint
    projections: dict[str, ProjectionRecord]
    frequency: float | None = None  # share of routed tokens in calibration, if profiled

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "layer": self.layer, "expert": self.expert, "shard": self.shard, "offset": self.offset,
            "nbytes": self.nbytes, "checksum": self.checksum, "source_bytes": self.source_bytes,
            "projections": {k: v.to_json() for k, v in self.projections.items()},
        }
        if self.frequency is not None:
            out["frequency"] = self.frequency
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str) -> ExpertRecord:
        projs = _get(obj, "projections", dict, where)
        freq = _number(obj, "frequency", where)
        return cls(
            _size(obj, "layer", where), _size(obj, "expert", where), _size(obj, "shard", where),
            _size(obj, "offset", where), _size(obj, "nbytes", where), _get(obj, "checksum", str, where),
            _size(obj, "source_bytes", where),
            {k: ProjectionRecord.from_json(v, f"{where} {k}") for k, v in projs.items()}, freq,
        )


@dataclass(frozen=True)
class TensorRecord:
    """A dense tensor (attention, norms, embeddings, routers) stored verbatim."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int
    nbytes: int
    checksum: str

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "shard": self.shard,
                "offset": self.offset, "nbytes": self.nbytes, "checksum": self.checksum}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> TensorRecord:
        return cls(_get(obj, "name", str, where), _dtype(obj, where), _shape(obj, where), _size(obj, "shard", where),
                   _size(obj, "offset", where), _size(obj, "nbytes", where), _get(obj, "checksum", str, where))


@dataclass(frozen=True)
class ShardRecord:
    name: str
    nbytes: int

    def to_json(self) -> dict:
        return {"name": self.name, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> ShardRecord:
        return cls(_get(obj, "name", str, where), _size(obj, "nbytes", where))


@dataclass
class Manifest:
    format_version: int
    model: dict  # {"model_type": ..., "config": {...}} copied from the source
    source: dict  # {"id": ..., "expert_bytes": int, "dense_bytes": int, ...}
    shards: list[ShardRecord]
    tensors: list[TensorRecord]
    experts: list[ExpertRecord]
    files: list[str] = field(default_factory=list)  # auxiliary files copied verbatim (config, tokenizer)
    meta: dict = field(default_factory=dict)  # free-form: generator, recipe summary, calibration info
