"""Validation of a pack before any payload byte is used: everything a hostile or damaged pack could get
wrong is checked here and reported as a typed error naming the file and the record."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np

from moepack.errors import (
    BadMagicError,
    ManifestError,
    OutOfRangeError,
    OverlapError,
    TruncatedError,
    UnsafeFileError,
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

MAX_FILE_BYTES = 256 << 20  # an auxiliary file (tokenizer.json, config.json, ...) larger than this is refused
MAX_JSON_DEPTH = 64  # manifest / JSON files nested deeper are refused before parsing (a real one is < 10)
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def check_file_name(name: str, pack: Path | str) -> None:
    """A shard or auxiliary file name must be a plain file name inside the pack directory."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", "..") or name == MANIFEST_NAME:
        raise UnsafePathError(f"file name {name!r} is not a plain file name inside the pack directory", path=pack)


def open_pack_file(pack: Path, name: str, *, max_bytes: int | None = None) -> tuple[int, os.stat_result]:
    """Open `pack/name` for reading: it must be a regular file directly inside the pack folder (not a symbolic
    link, FIFO or device: checked with lstat before opening, then again on the open descriptor, which is opened
    without following links and non-blocking so nothing can hang), at most `max_bytes` long. Returns the raw
    descriptor (the caller closes it) and its fstat."""
    path = pack / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise TruncatedError(f"{name} is missing from the pack", path=path) from None
    except OSError as exc:
        raise UnsafeFileError(f"{name} cannot be examined: {exc.strerror}", path=path) from None
    _check_regular(st, name, path, max_bytes)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise UnsafeFileError(f"{name} cannot be opened: {exc.strerror}", path=path) from None
    try:
        fst = os.fstat(fd)
        _check_regular(fst, name, path, max_bytes)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise UnsafeFileError(f"{name} was replaced while being opened", path=path)
    except BaseException:
        os.close(fd)
        raise
    return fd, fst


def _check_regular(st: os.stat_result, name: str, path: Path, max_bytes: int | None) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError(f"{name} is a symbolic link; every pack file must be a regular file inside the "
                              "pack folder (copy the file in instead of linking it)", path=path)
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode) else \
            "device or socket"
        raise UnsafeFileError(f"{name} is a {kind}, not a regular file", path=path)
    if max_bytes is not None and st.st_size > max_bytes:
        raise UnsafeFileError(f"{name} is {st.st_size} bytes, over the {max_bytes}-byte limit for this file",
                              path=path)


def read_pack_file(pack: Path, name: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole of a small pack file (manifest, tokenizer, config), opened as `open_pack_file` does."""
    fd, st = open_pack_file(pack, name, max_bytes=max_bytes)
    try:
        chunks, left = [], st.st_size + 1  # one byte more: a file that grew past its stat size is seen
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise UnsafeFileError(f"{name} cannot be read: {exc.strerror}", path=pack / name) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise UnsafeFileError(f"{name} grew past the {max_bytes}-byte limit while being read", path=pack / name)
    return data


def check_json_depth(data: bytes, path: Path, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` before parsing it (Python's parser, and code walking the result,
    would fail with RecursionError). Strings are blanked first, so brackets inside them do not count."""
    blanked = _JSON_STRING.sub(b'""', data)
    codes = np.frombuffer(blanked, dtype=np.uint8)
    steps = ((codes == ord("{")) | (codes == ord("["))).astype(np.int32) - \
        ((codes == ord("}")) | (codes == ord("]"))).astype(np.int32)
    if steps.size and int(np.cumsum(steps).max()) > limit:
        raise ManifestError(f"JSON is nested more than {limit} levels deep; refused before parsing", path=path)


def parse_json(data: bytes, path: Path, *, error=ManifestError):
    """Strict JSON (UTF-8, no NaN/Infinity, depth-bounded) or `error` naming the file."""
    try:
        check_json_depth(data, path)
    except ManifestError as exc:
        raise error(str(exc).removeprefix(f"{path}: "), path=path) from None
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"not valid JSON: {exc}", path=path) from None


def read_manifest(pack: Path) -> Manifest:
    """Parse and structurally validate `pack/manifest.json` (no payload bytes are touched)."""
    path = pack / MANIFEST_NAME
    if not pack.is_dir():
        raise ManifestError("not a pack directory (expected NAME.moepack/ containing manifest.json)", path=pack)
    if not os.path.lexists(path):
        raise ManifestError("manifest.json is missing: this is not a complete pack (an interrupted compress?)", path=pack)
    obj = parse_json(read_pack_file(pack, MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES), path)
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
            _check_parts(f"{where} {proj}", rec, e.nbytes, path, m.format_version)

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


def _check_parts(where: str, rec, blob_nbytes: int, path: Path, version: int) -> None:
    from moepack import codecs  # light; imported lazily so the format layer loads without it

    try:
        specs = codecs.part_specs(rec.recipe, rec.shape)
        recipe = codecs.as_recipe(rec.recipe)
    except Exception as exc:  # a recipe this moepack cannot decode
        raise ManifestError(f"{where}: recipe {rec.recipe!r} cannot be read: {exc}", path=path) from None
    if version < 2 and (recipe.dq or not recipe.divides(rec.shape[1])):
        raise ManifestError(f"{where}: recipe {rec.recipe!r} on {rec.shape[1]} columns needs a ragged group, a "
                            f"short N:M block or double-quantised metadata, which format version {version} cannot "
                            "hold", path=path)
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
    """The shard is a regular file inside the pack, has the recorded size, and its header matches."""
    fd = open_shard(pack, index, rec)
    os.close(fd)


def open_shard(pack: Path, index: int, rec: ShardRecord) -> int:
    """`check_shard`, returning the open descriptor (the caller closes it)."""
    path = pack / rec.name
    if os.path.islink(path):
        raise UnsafeFileError(f"shard {rec.name!r} is a symbolic link (it could lead outside the pack directory); "
                              "shards must be regular files inside the pack", path=path)
    fd, st = open_pack_file(pack, rec.name)
    try:
        check_shard_size(st.st_size, rec, path)
        head = os.pread(fd, 24, 0)
        check_shard_header(head, index, rec, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_shard_size(size: int, rec: ShardRecord, path: Path) -> None:
    if size < rec.nbytes:
        raise TruncatedError(f"shard is {size} bytes but the manifest records {rec.nbytes}: the file is truncated", path=path)
    if size > rec.nbytes:
        raise OutOfRangeError(f"shard is {size} bytes but the manifest records {rec.nbytes}: unexpected trailing bytes", path=path)


def check_shard_header(head: bytes, index: int, rec: ShardRecord, path: Path) -> None:
    if len(head) < 24 or head[:8] != SHARD_MAGIC:
        raise BadMagicError(f"shard does not start with the moepack magic {SHARD_MAGIC!r}", path=path)
    version, shard_index, nbytes = struct.unpack("<IIQ", head[8:24])
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(f"shard format version {version} is not supported ({list(SUPPORTED_VERSIONS)})", path=path)
    if shard_index != index or nbytes != rec.nbytes:
        raise ManifestError(f"shard header says index {shard_index}, {nbytes} bytes; manifest says index {index}, "
                            f"{rec.nbytes} bytes", path=path)


# --- the manifest against the model its config describes -----------------------------------------------
def dense_shapes(spec, adapter) -> dict[str, tuple[int, ...]]:
    """The shape of every dense tensor the forward reads, by on-disk name (roles: arch/base.py)."""
    h, v, q, kv, e = spec.hidden_size, spec.vocab_size, spec.q_size, spec.kv_size, spec.num_experts
    norm = {"head": (spec.head_dim, spec.head_dim), "full": (q, kv)}.get(spec.qk_norm, (0, 0))
    shared, dense = spec.shared_expert_intermediate_size, spec.dense_intermediate_size or 0
    by_role = {
        "embed": (v, h), "lm_head": (v, h), "final_norm": (h,), "input_norm": (h,), "post_attn_norm": (h,),
        "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,),
        "o_bias": (h,), "q_norm": (norm[0],), "k_norm": (norm[1],), "router": (e, h), "router_bias": (e,),
        "shared_gate": (shared, h), "shared_up": (shared, h), "shared_down": (h, shared),
        "shared_expert_gate": (1, h), "mlp_gate": (dense, h), "mlp_up": (dense, h), "mlp_down": (h, dense),
    }
    by_role.update(sinks=(spec.num_heads,), expert_gu_bias=(e, 2 * spec.moe_intermediate_size),
                   expert_down_bias=(e, h))  # GPT-OSS
    from moepack.arch.deepseek import mla_shapes

    by_role.update(mla_shapes(spec))  # MLA's projections (none for other families)
    shapes = {name: by_role[role] for role, name in adapter.global_tensor_names().items() if role in by_role}
    for layer in range(spec.num_layers):
        for role, name in adapter.layer_tensor_names(layer).items():
            if role in by_role:
                shapes[name] = by_role[role]
    return shapes


def check_model(m: Manifest, spec, path: Path) -> None:
    """Everything the forward reads is in the manifest with the shape the config implies: each dense tensor
    the family's adapter names, and one expert record per (sparse layer, expert) with [I, H] projections."""
    from moepack.arch import adapter_for
    from moepack.errors import ModelMismatchError

    adapter = adapter_for(spec)
    records = {t.name: t for t in m.tensors}
    shapes = dense_shapes(spec, adapter)
    for name in adapter.dense_tensor_names():
        rec = records.get(name)
        if rec is None:
            raise ModelMismatchError(f"the {spec.family} model reads the dense tensor {name!r}, which the manifest "
                                     "does not list (renamed or removed?)", path=path)
        want = shapes.get(name)
        if want is not None and tuple(rec.shape) != want:
            raise ModelMismatchError(f"tensor {name!r} has shape {list(rec.shape)} but the config implies "
                                     f"{list(want)}", path=path)
    wanted = {(layer, e) for layer in spec.sparse_layer_ids for e in range(spec.num_experts)}
    have = {e.key for e in m.experts}
    for keys, what in ((sorted(wanted - have), "missing"), (sorted(have - wanted), "not in the model")):
        if keys:
            shown = ", ".join(f"{layer}.{e}" for layer, e in keys[:4]) + (" ..." if len(keys) > 4 else "")
            raise ModelMismatchError(f"{len(keys)} expert record(s) {what} ({shown}); the config has "
                                     f"{spec.num_experts} experts in sparse layers "
                                     f"{list(spec.sparse_layer_ids)[:8]}", path=path)
    shape = spec.expert_shape()
    for e in m.experts:
        for proj, rec in e.projections.items():
            if tuple(rec.shape) != shape:
                raise ModelMismatchError(f"expert {e.layer}.{e.expert} {proj}: shape {list(rec.shape)} but the "
                                         f"config implies {list(shape)}", path=path)
