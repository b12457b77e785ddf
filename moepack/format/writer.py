"""PackWriter: streams records into size-limited shards inside a temporary directory and publishes the
pack atomically (fsync, then rename) only when everything is written. Output is deterministic: the same
calls in the same order give the same bytes.

It cannot destroy (moepack.format.publish): it holds a lock on the output path while it writes, replaces
only a moepack pack (and only with `overwrite`), turns disk-full and permission failures into
PackWriteError, and leaves the old pack or the new one at the path, never neither; `recover_replace(path)`
repairs what a killed writer left."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from moepack.errors import MoepackError
from moepack.format.checksum import RunningChecksum, checksum
from moepack.format.constants import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    EXPERT_ALIGNMENT,
    FORMAT_VERSION,
    MANIFEST_MAGIC,
    MANIFEST_NAME,
    PART_ALIGNMENT,
    PROJECTIONS,
    SHARD_HEADER_BYTES,
    SHARD_MAGIC,
    SHARD_NAME_FORMAT,
    TENSOR_ALIGNMENT,
)
from moepack.format.publish import (
    OutputLock,
    check_output,
    hidden,
    output_path,
    recover_locked,
    recover_replace,
    remove_tree,
    write_error,
)
from moepack.format.records import ExpertRecord, PartRecord, ProjectionRecord, ShardRecord, TensorRecord
from moepack.format.validate import check_file_name

assert sys.byteorder == "little", "moepack packs are little-endian; big-endian hosts are not supported"


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (any dtype, bf16 included), without a copy when contiguous."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def shard_header(index: int, nbytes: int) -> bytes:
    head = SHARD_MAGIC + struct.pack("<IIQ", FORMAT_VERSION, index, nbytes)
    return head + b"\x00" * (SHARD_HEADER_BYTES - len(head))


class PackWriter:
    """Write a pack: `add_tensor` / `add_expert` / `add_file` in a fixed order, then `finish()`.

    Used as a context manager, an exception aborts and removes the temporary directory, so an
    interrupted compress never leaves anything that looks like a pack at `path`. Construction takes the
    output lock (OutputInUseError if another writer has it), repairs what killed writers left (the message is
    in `recovered`), and refuses an existing path that is not a pack, or a pack without `overwrite`
    (OutputExistsError)."""

    def __init__(self, path: str | Path, *, model: dict, source: dict, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, meta: dict | None = None):
        if shard_bytes <= 0:
            raise MoepackError(f"shard size must be positive, got {shard_bytes}")
        self.path = output_path(path)
        self.overwrite = overwrite
        self.tmp = hidden(self.path, "partial")
        self._lock, self._locked = OutputLock(self.path).acquire(), True
        try:
            self.recovered = recover_locked(self.path)
            check_output(self.path, overwrite)
            with self._io("creating the temporary pack folder"):
                remove_tree(self.tmp)  # this PID's, from an earlier process: nobody writes it (we hold the lock)
                self.tmp.mkdir()
        except BaseException:
            self._unlock()
            raise
        self.model, self.source, self.meta = model, source, dict(meta or {})
        self.shard_bytes = shard_bytes
        self.shards: list[ShardRecord] = []
        self.tensors: list[TensorRecord] = []
        self.experts: list[ExpertRecord] = []
        self.files: list[str] = []
        self._fh = None  # current shard file
        self._pos = 0
        self._done = False

    # -- shards ------------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        self._close_shard()
        name = SHARD_NAME_FORMAT.format(len(self.shards))
        self._fh = open(self.tmp / name, "wb")
        self._fh.write(shard_header(len(self.shards), 0))  # size patched on close
        self._pos = SHARD_HEADER_BYTES
        self.shards.append(ShardRecord(name, 0))

    def _close_shard(self) -> None:
        if self._fh is None:
            return
        index = len(self.shards) - 1
        self._fh.seek(0)
        self._fh.write(shard_header(index, self._pos))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self.shards[index] = ShardRecord(self.shards[index].name, self._pos)

    def _reserve(self, nbytes: int, alignment: int) -> tuple[int, int]:
        """Place a record of `nbytes`: returns (shard index, offset), padding the shard up to `offset`."""
        if self._fh is None:
            self._open_shard()
        start = align_up(self._pos, alignment)
        if start + nbytes > self.shard_bytes and self._pos > SHARD_HEADER_BYTES:
            self._open_shard()
            start = align_up(self._pos, alignment)
        self._fh.write(b"\x00" * (start - self._pos))
        self._pos = start
        return len(self.shards) - 1, start

    def _write(self, data) -> None:
        self._fh.write(data)
        self._pos += len(data)

    # -- records -----------------------------------------------------------------------------------
    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """OSError (disk full, permission, ...) -> PackWriteError naming the path."""
        try:
            yield
        except OSError as exc:
            raise write_error(exc, self.path, doing) from None

    def add_tensor(self, name: str, tensor: torch.Tensor) -> TensorRecord:
        data = tensor_bytes(tensor)
        with self._io(f"writing tensor {name}"):
            shard, offset = self._reserve(len(data), TENSOR_ALIGNMENT)
            self._write(data)
        rec = TensorRecord(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), shard, offset, len(data), checksum(data))
        self.tensors.append(rec)
        return rec

    def add_expert(self, layer: int, expert: int, projections: dict[str, tuple[str, tuple[int, int], dict[str, torch.Tensor]]],
                   *, source_bytes: int, errors: dict[str, float] | None = None,
                   frequency: float | None = None) -> ExpertRecord:
        """`projections[proj] = (recipe, shape, parts)` for proj in up/gate/down; parts in codec order."""
        payloads: list[tuple[int, memoryview]] = []
        proj_records: dict[str, ProjectionRecord] = {}
        pos = 0
        for proj in PROJECTIONS:
            recipe, shape, parts = projections[proj]
            part_records = []
            for pname, t in parts.items():
                data = tensor_bytes(t)
                pos = align_up(pos, PART_ALIGNMENT)
                part_records.append(PartRecord(pname, DTYPE_NAMES[t.dtype], tuple(t.shape), pos, len(data)))
                payloads.append((pos, data))
                pos += len(data)
            err = (errors or {}).get(proj)
            proj_records[proj] = ProjectionRecord(str(recipe), (int(shape[0]), int(shape[1])), tuple(part_records), err)
        digest, written = RunningChecksum(), 0
        with self._io(f"writing expert {layer}.{expert}"):
            shard, offset = self._reserve(pos, EXPERT_ALIGNMENT)
            for rel, data in payloads:
                pad = b"\x00" * (rel - written)
                digest.update(pad)
                digest.update(data)
                self._write(pad)
                self._write(data)
                written = rel + len(data)
        rec = ExpertRecord(layer, expert, shard, offset, pos, digest.hexdigest(), source_bytes, proj_records, frequency)
        self.experts.append(rec)
        return rec

    def add_file(self, name: str, data: bytes) -> None:
        """An auxiliary file stored verbatim beside the manifest (config.json, tokenizer.json, ...)."""
        check_file_name(name, self.path)
        with self._io(f"writing {name}"):
            (self.tmp / name).write_bytes(data)
        self.files.append(name)

    # -- publish -----------------------------------------------------------------------------------
    def manifest_json(self) -> dict:
        return {
            "magic": MANIFEST_MAGIC,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "source": self.source,
            "meta": self.meta,
            "files": sorted(self.files),
            "shards": [s.to_json() for s in self.shards],
            "tensors": [t.to_json() for t in self.tensors],
            "experts": [e.to_json() for e in self.experts],
        }

    def finish(self) -> Path:
        """Write the manifest last, fsync, and publish (the lock is released after)."""
        with self._io("writing the pack"):
            self._close_shard()
            text = json.dumps(self.manifest_json(), indent=1, sort_keys=True, allow_nan=False)
            for name in self.files:
                _fsync_file(self.tmp / name)
            manifest = self.tmp / MANIFEST_NAME
            manifest.write_text(text + "\n", encoding="utf-8")  # written last: its presence marks completeness
            _fsync_file(manifest)
            _fsync_dir(self.tmp)
        check_output(self.path, self.overwrite)  # again: something may have appeared there meanwhile
        old = None
        with self._io("publishing the pack"):
            if os.path.lexists(self.path):
                old = hidden(self.path, "old")
                os.replace(self.path, old)  # the commit point: from here recovery completes the replace
            try:
                os.replace(self.tmp, self.path)
            except OSError:
                if old is not None:  # put the old pack back rather than leave neither
                    os.replace(old, self.path)
                raise
            _fsync_dir(self.path.parent)
        if old is not None:
            remove_tree(old)
        self._done = True
        self._unlock()
        return self.path

    def abort(self) -> Path | None:
        """Remove the temporary folder and release the lock; never raises. Returns the folder if some of it
        could not be removed (the next compress into this folder removes it)."""
        if self._fh is not None:
            try:
                self._fh.close()  # on a full disk the final flush fails: the file is removed just below
            except OSError:
                pass
            self._fh = None
        left = None if remove_tree(self.tmp) else self.tmp
        self._unlock()
        return left

    def _unlock(self) -> None:
        if self._locked:  # once: the lock is re-entrant, and compress() holds it too
            self._locked = False
            self._lock.release()

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._done:
            return
        left = self.abort()
        if left is not None and isinstance(exc, MoepackError):
            raise type(exc)(f"{exc}; could not remove {left} either: the next compress into this folder "
                            f"removes it") from None


__all__ = ["PackWriter", "recover_replace"]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
