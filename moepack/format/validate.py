"""Validation of a pack before any payload byte is used: everything a hostile or damaged pack could get
wrong is checked here and reported as a typed error naming the file and the record."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from moepack.errors import (
    BadMagicError,
    ManifestError,
    OutOfRangeError,
    OverlapError,
    TruncatedError,
    UnsafePathError,
    UnsupportedVersionError,
)
from moepack.format.constants import (
    DTYPE_NAMES,
    EXPERT_ALIGNMENT,
    MANIFEST_MAGIC,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PART_ALIGNMENT,
    PROJECTIONS,
    SHARD_HEADER_BYTES,
    SHARD_MAGIC,
    SUPPORTED_VERSIONS,
    TENSOR_ALIGNMENT,
)
from moepack.format.records import (
    ExpertRecord,
    Manifest,
    ShardRecord,
    TensorRecord,
    _get,
    expected_nbytes,
)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_file_name(name: str, pack: Path | str) -> None:
    """A shard or auxiliary file name must be a plain file name inside the pack directory."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", "..") or name == MANIFEST_NAME:
        raise UnsafePathError(f"file name {name!r} is not a plain file name inside the pack directory", path=pack)


def read_manifest(pack: Path) -> Manifest:
    """Parse and structurally validate `pack/manifest.json` (no payload bytes are touched)."""
    path = pack / MANIFEST_NAME
    if not pack.is_dir():
        raise ManifestError("not a pack directory (expected NAME.moepack/ containing manifest.json)", path=pack)
    if not path.is_file():
        raise ManifestError("manifest.json is missing: this is not a complete pack (an interrupted compress?)", path=pack)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit", path=path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ManifestError(f"not valid JSON: {exc}", path=path) from None
    if not isinstance(obj, dict) or obj.get("magic") != MANIFEST_MAGIC:
        raise BadMagicError(f"magic is {obj.get('magic') if isinstance(obj, dict) else None!r}, expected {MANIFEST_MAGIC!r}", path=path)
    version = obj.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"format version {version!r} is not supported by this moepack (supports {list(SUPPORTED_VERSIONS)}); "
            "upgrade moepack or re-run compress", path=path)
    try:
        manifest = Manifest(
            format_version=version,
            model=_get(obj, "model", dict, "manifest"),
            source=_get(obj, "source", dict, "manifest"),
            shards=[ShardRecord.from_json(s, f"shard {i}") for i, s in enumerate(_get(obj, "shards", list, "manifest"))],
            tensors=[TensorRecord.from_json(t, f"tensor {i}") for i, t in enumerate(_get(obj, "tensors", list, "manifest"))],
            experts=[ExpertRecord.from_json(e, f"expert {i}") for i, e in enumerate(_get(obj, "experts", list, "manifest"))],
            files=list(_get(obj, "files", list, "manifest")),
            meta=obj.get("meta", {}) if isinstance(obj.get("meta", {}), dict) else {},
        )
    except (ManifestError, OutOfRangeError) as exc:
        raise type(exc)(str(exc), path=path) from None
    _check_records(manifest, path)
    return manifest


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _check_records(m: Manifest, path: Path) -> None:
    """Internal consistency: names, sizes, alignment, shard indices, part layouts, duplicates."""
    for s in m.shards:
        check_file_name(s.name, path.parent)
    for f in m.files:
        check_file_name(f, path.parent)
    if len({s.name for s in m.shards}) != len(m.shards):
        raise ManifestError("duplicate shard names", path=path)

    def in_shard(where: str, shard: int, offset: int, nbytes: int, alignment: int) -> None:
        if shard >= len(m.shards):
            raise OutOfRangeError(f"{where}: shard index {shard} but the pack has {len(m.shards)} shards", path=path)
        end = m.shards[shard].nbytes
        if offset < SHARD_HEADER_BYTES or offset + nbytes > end:
            raise OutOfRangeError(f"{where}: bytes [{offset}, {offset + nbytes}) lie outside shard "
                                  f"{m.shards[shard].name} (data area [{SHARD_HEADER_BYTES}, {end}))", path=path)
        if offset % alignment:
            raise OutOfRangeError(f"{where}: offset {offset} is not aligned to {alignment} bytes", path=path)

    names = set()
    for t in m.tensors:
        if t.name in names:
            raise ManifestError(f"tensor {t.name!r} appears twice", path=path)
        names.add(t.name)
        if t.nbytes != expected_nbytes(t.dtype, t.shape):
            raise OutOfRangeError(f"tensor {t.name!r}: nbytes {t.nbytes} does not match {t.dtype}{list(t.shape)}", path=path)
        in_shard(f"tensor {t.name!r}", t.shard, t.offset, t.nbytes, TENSOR_ALIGNMENT)

    keys = set()
    for e in m.experts:
        where = f"expert {e.layer}.{e.expert}"
        if e.key in keys:
            raise ManifestError(f"{where} appears twice", path=path)
        keys.add(e.key)
        in_shard(where, e.shard, e.offset, e.nbytes, EXPERT_ALIGNMENT)
        if set(e.projections) != set(PROJECTIONS):
            raise ManifestError(f"{where}: projections {sorted(e.projections)} should be {sorted(PROJECTIONS)}", path=path)
        for proj, rec in e.projections.items():
            _check_parts(f"{where} {proj}", rec, e.nbytes, path)

    # no two records may share bytes within a shard
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for t in m.tensors:
        spans.setdefault(t.shard, []).append((t.offset, t.offset + t.nbytes, f"tensor {t.name!r}"))
    for e in m.experts:
        spans.setdefault(e.shard, []).append((e.offset, e.offset + e.nbytes, f"expert {e.layer}.{e.expert}"))
    for shard, items in spans.items():
        items.sort()
        for (s0, e0, n0), (s1, _e1, n1) in zip(items, items[1:], strict=False):
            if s1 < e0:
                raise OverlapError(f"{n0} [{s0}, {e0}) and {n1} (from {s1}) overlap in {m.shards[shard].name}", path=path)


def _check_parts(where: str, rec, blob_nbytes: int, path: Path) -> None:
    from moepack import codecs  # light; imported lazily so the format layer loads without it

    try:
        specs = codecs.part_specs(rec.recipe, rec.shape)
    except Exception as exc:  # a recipe this moepack cannot decode
        raise ManifestError(f"{where}: recipe {rec.recipe!r} cannot be read: {exc}", path=path) from None
    got = [(p.name, p.dtype, tuple(p.shape)) for p in rec.parts]
    want = [(s.name, DTYPE_NAMES[s.dtype], tuple(s.shape)) for s in specs]
    if got != want:
        raise ManifestError(f"{where}: parts {got} do not match recipe {rec.recipe!r} (expected {want})", path=path)
    end = 0
    for p in rec.parts:
        if p.nbytes != expected_nbytes(p.dtype, p.shape):
            raise OutOfRangeError(f"{where} part {p.name}: nbytes {p.nbytes} does not match {p.dtype}{list(p.shape)}", path=path)
        if p.offset % PART_ALIGNMENT or p.offset < end or p.offset + p.nbytes > blob_nbytes:
            raise OutOfRangeError(f"{where} part {p.name}: range [{p.offset}, {p.offset + p.nbytes}) is misaligned, "
                                  f"overlapping or outside the {blob_nbytes}-byte expert blob", path=path)
        end = p.offset + p.nbytes


def check_shard(pack: Path, index: int, rec: ShardRecord) -> None:
    """The shard exists inside the pack, has the recorded size, and its header matches."""
    path = pack / rec.name
    real_pack = os.path.realpath(pack)
    if os.path.commonpath([real_pack, os.path.realpath(path)]) != real_pack:
        raise UnsafePathError(f"shard {rec.name!r} resolves outside the pack directory", path=pack)
    if not path.is_file():
        raise TruncatedError("shard is missing", path=path)
    size = path.stat().st_size
    if size < rec.nbytes:
        raise TruncatedError(f"shard is {size} bytes but the manifest records {rec.nbytes}: the file is truncated", path=path)
    if size > rec.nbytes:
        raise OutOfRangeError(f"shard is {size} bytes but the manifest records {rec.nbytes}: unexpected trailing bytes", path=path)
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:8] != SHARD_MAGIC:
        raise BadMagicError(f"shard does not start with the moepack magic {SHARD_MAGIC!r}", path=path)
    version, shard_index, nbytes = struct.unpack("<IIQ", head[8:24])
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(f"shard format version {version} is not supported ({list(SUPPORTED_VERSIONS)})", path=path)
    if shard_index != index or nbytes != rec.nbytes:
        raise ManifestError(f"shard header says index {shard_index}, {nbytes} bytes; manifest says index {index}, "
                            f"{rec.nbytes} bytes", path=path)
