"""Pack reader: validates the manifest and shards first, then exposes zero-copy, memory-mapped views.

Shards are mapped copy-on-write (MAP_PRIVATE): tensors made from them are writable views whose writes
never reach the file, and untouched pages cost no memory."""

from __future__ import annotations

import mmap
from functools import cached_property
from pathlib import Path

import torch

from moepack.errors import ChecksumError, MoepackError
from moepack.format.checksum import checksum
from moepack.format.constants import DTYPES, MANIFEST_NAME
from moepack.format.records import ExpertRecord, Manifest, ProjectionRecord, TensorRecord
from moepack.format.validate import check_shard, read_manifest


class Pack:
    """An opened, validated `.moepack` directory."""

    def __init__(self, path: str | Path, *, verify: bool = False):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        for i, shard in enumerate(self.manifest.shards):
            check_shard(self.path, i, shard)
        self._maps: list[mmap.mmap | None] = [None] * len(self.manifest.shards)
        self._buffers: list[torch.Tensor | None] = [None] * len(self.manifest.shards)
        self.tensor_records: dict[str, TensorRecord] = {t.name: t for t in self.manifest.tensors}
        self.expert_records: dict[tuple[int, int], ExpertRecord] = {e.key: e for e in self.manifest.experts}
        self._verified: set = set()
        if verify:
            self.verify()

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> Pack:
        return cls(path, verify=verify)

    # -- metadata ----------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.manifest.model.get("config", {})

    @cached_property
    def spec(self):
        from moepack.arch import spec_from_config

        return spec_from_config(self.config)

    def file_path(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise MoepackError(f"the pack has no file {name!r} (it has {self.manifest.files})", path=self.path)
        return self.path / name

    @property
    def expert_bytes(self) -> int:
        return sum(e.nbytes for e in self.manifest.experts)

    @property
    def dense_bytes(self) -> int:
        return sum(t.nbytes for t in self.manifest.tensors)

    # -- payload -----------------------------------------------------------------------------------
    def _shard_buffer(self, index: int) -> torch.Tensor:
        """The whole shard as a flat uint8 tensor over its memory map."""
        buf = self._buffers[index]
        if buf is None:
            rec = self.manifest.shards[index]
            with open(self.path / rec.name, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), rec.nbytes, access=mmap.ACCESS_COPY)
            self._maps[index] = mm
            buf = torch.frombuffer(mm, dtype=torch.uint8)
            self._buffers[index] = buf
        return buf

    def raw(self, shard: int, offset: int, nbytes: int) -> torch.Tensor:
        return self._shard_buffer(shard)[offset : offset + nbytes]

    def tensor(self, name: str, *, verify: bool = False) -> torch.Tensor:
        """A dense tensor as a zero-copy view of the mapped shard."""
        rec = self.tensor_records.get(name)
        if rec is None:
            raise MoepackError(f"the pack has no tensor {name!r}", path=self.path)
        data = self.raw(rec.shard, rec.offset, rec.nbytes)
        if verify:
            self._verify(("t", name), data, rec.checksum, f"tensor {name!r}", rec.shard)
        return data.view(DTYPES[rec.dtype]).reshape(rec.shape)

    def expert_blob(self, layer: int, expert: int, *, verify: bool = False) -> torch.Tensor:
        """An expert's whole payload: one contiguous uint8 range (one read, one device copy)."""
        rec = self.expert(layer, expert)
        data = self.raw(rec.shard, rec.offset, rec.nbytes)
        if verify:
            self._verify(("e", rec.key), data, rec.checksum, f"expert {layer}.{expert}", rec.shard)
        return data

    def release(self, layer: int, expert: int) -> None:
        """Drop an expert's mapped pages from this process (they stay in the OS page cache)."""
        rec = self.expert(layer, expert)
        mm = self._maps[rec.shard]
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = rec.offset - rec.offset % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, rec.offset + rec.nbytes - start)

    def expert(self, layer: int, expert: int) -> ExpertRecord:
        rec = self.expert_records.get((layer, expert))
        if rec is None:
            raise MoepackError(f"the pack has no expert {layer}.{expert}", path=self.path)
        return rec

    def verify(self) -> None:
        """Check every record's checksum (reads the whole pack once)."""
        for t in self.manifest.tensors:
            self.tensor(t.name, verify=True)
        for e in self.manifest.experts:
            self.expert_blob(e.layer, e.expert, verify=True)

    def _verify(self, key, data: torch.Tensor, expected: str, what: str, shard: int) -> None:
        if key in self._verified:
            return
        if checksum(data.numpy()) != expected:
            raise ChecksumError(f"{what}: checksum mismatch (the bytes on disk are damaged)",
                                path=self.path / self.manifest.shards[shard].name)
        self._verified.add(key)

    def close(self) -> None:
        self._buffers = [None] * len(self._buffers)
        for mm in self._maps:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # views still alive elsewhere; the map closes when they are freed
                    pass
        self._maps = [None] * len(self._maps)

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pack({str(self.path)!r}, experts={len(self.manifest.experts)}, shards={len(self.manifest.shards)})"


def projection_parts(blob: torch.Tensor, rec: ProjectionRecord) -> dict[str, torch.Tensor]:
    """Typed views of one projection's parts inside an expert blob (works for CPU or device blobs)."""
    return {p.name: blob[p.offset : p.offset + p.nbytes].view(DTYPES[p.dtype]).reshape(p.shape) for p in rec.parts}


def is_pack(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file()
