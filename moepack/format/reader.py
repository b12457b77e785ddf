"""Pack reader: validates the manifest and shards first, then reads records with positioned reads.

Every payload byte reaches the process through `os.preadv` into memory the process owns, never through a
memory map of the shard: a shard truncated while a run uses it then gives a short read (a TruncatedError
naming the shard) instead of a SIGBUS, and bytes changed on disk cannot alter weights already verified.
Expert blobs read with `expert_blob` stay cached until `release`; `read_expert_into` reads straight into
a caller's buffer (a cache slot or a pinned staging buffer) and checks the checksum on every load."""

from __future__ import annotations

import os
import threading
from functools import cached_property
from pathlib import Path

import torch

from moepack.errors import ChecksumError, ManifestError, MoepackError, TokenizerError, TruncatedError
from moepack.format.checksum import checksum
from moepack.format.constants import DTYPES, MANIFEST_NAME
from moepack.format.records import ExpertRecord, Manifest, ProjectionRecord, TensorRecord
from moepack.format.validate import (
    MAX_FILE_BYTES,
    check_file_name,
    check_model,
    open_shard,
    read_manifest,
    read_pack_file,
)

TOKENIZER_NAME = "tokenizer.json"
_MAX_READ = 1 << 30  # one preadv call moves at most this much (Linux caps a call just under 2 GiB)


class Pack:
    """An opened, validated `.moepack` directory."""

    def __init__(self, path: str | Path, *, verify: bool = False):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        self._fds: list[int | None] = [None] * len(self.manifest.shards)
        self._lock = threading.Lock()
        try:
            for i in range(len(self.manifest.shards)):
                self._fd(i)
        except BaseException:
            self.close()
            raise
        self.tensor_records: dict[str, TensorRecord] = {t.name: t for t in self.manifest.tensors}
        self.expert_records: dict[tuple[int, int], ExpertRecord] = {e.key: e for e in self.manifest.experts}
        self._blobs: dict[tuple[int, int], torch.Tensor] = {}  # expert_blob's private copies until release()
        self._verified: set[tuple[int, int]] = set()  # keys of cached blobs whose checksum matched
        if verify:
            self.verify()

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> Pack:
        return cls(path, verify=verify)

    # -- metadata ----------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        config = self.manifest.model.get("config", {})
        return config if isinstance(config, dict) else {}

    @cached_property
    def spec(self):
        """The ModelSpec of the pack's config, checked against the manifest: every dense tensor the model
        reads and every expert record exist, with the shapes the config implies (ModelMismatchError)."""
        from moepack.arch import spec_from_config

        spec = spec_from_config(self.config)
        check_model(self.manifest, spec, self.path / MANIFEST_NAME)
        return spec

    def file_path(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise MoepackError(f"the pack has no file {name!r} (it has {self.manifest.files})", path=self.path)
        return self.path / name

    def read_file(self, name: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        """An auxiliary file's bytes: a regular file inside the pack (no link, FIFO or device), size-bounded."""
        check_file_name(name, self.path)
        self.file_path(name)
        return read_pack_file(self.path, name, max_bytes=max_bytes)

    def tokenizer(self):
        """The pack's tokenizer as a `tokenizers.Tokenizer`, or None when the pack has no tokenizer.json.
        A damaged file (unsafe, too large, not UTF-8, not a tokenizer, or with ids beyond the model's
        vocabulary) raises TokenizerError (or UnsafeFileError) naming the file."""
        if TOKENIZER_NAME not in self.manifest.files:
            return None
        from tokenizers import Tokenizer

        from moepack.format.validate import check_json_depth

        path = self.path / TOKENIZER_NAME
        data = self.read_file(TOKENIZER_NAME)
        try:
            check_json_depth(data, path)  # bounded nesting before any parser sees it
            text = data.decode("utf-8")
        except ManifestError as exc:
            raise TokenizerError(str(exc).removeprefix(f"{path}: "), path=path) from None
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"not UTF-8 text: {exc}", path=path) from None
        try:
            tok = Tokenizer.from_str(text)
            size = tok.get_vocab_size(with_added_tokens=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # tokenizers raises Exception, and PanicException (a BaseException)
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise TokenizerError(f"not a valid tokenizer: {first}", path=path) from None
        vocab = self.spec.vocab_size if "model_type" in self.config else None
        if vocab is not None and size > vocab:
            raise TokenizerError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab}: "
                                 "they do not belong together", path=path)
        return tok

    @property
    def expert_bytes(self) -> int:
        return sum(e.nbytes for e in self.manifest.experts)

    @property
    def dense_bytes(self) -> int:
        return sum(t.nbytes for t in self.manifest.tensors)

    # -- payload -----------------------------------------------------------------------------------
    def _fd(self, index: int) -> int:
        fd = self._fds[index]
        if fd is None:
            with self._lock:
                fd = self._fds[index]
                if fd is None:
                    fd = open_shard(self.path, index, self.manifest.shards[index])
                    self._fds[index] = fd
        return fd

    def _shard_path(self, index: int) -> Path:
        return self.path / self.manifest.shards[index].name

    def _read_into(self, shard: int, offset: int, dst: torch.Tensor, what: str) -> None:
        """Fill the contiguous CPU uint8 tensor `dst` with shard bytes [offset, offset + dst.numel())."""
        view = memoryview(dst.numpy()).cast("B")
        fd, done, n = self._fd(shard), 0, len(view)
        while done < n:
            try:
                got = os.preadv(fd, [view[done:done + _MAX_READ]], offset + done)
            except OSError as exc:
                raise TruncatedError(f"{what}: reading the shard failed: {exc.strerror}",
                                     path=self._shard_path(shard)) from None
            if got == 0:
                size = os.fstat(fd).st_size
                raise TruncatedError(
                    f"{what}: the shard ends at byte {size} but the record needs bytes up to {offset + n} "
                    f"(the manifest records {self.manifest.shards[shard].nbytes}): it was truncated while in use",
                    path=self._shard_path(shard))
            done += got

    def _check(self, data: torch.Tensor, expected: str, what: str, shard: int) -> None:
        if checksum(data.numpy()) != expected:
            raise ChecksumError(f"{what}: checksum mismatch (the bytes on disk are damaged or were changed "
                                "while in use)", path=self._shard_path(shard))

    def raw(self, shard: int, offset: int, nbytes: int) -> torch.Tensor:
        """A private copy of shard bytes [offset, offset + nbytes)."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        self._read_into(shard, offset, out, f"bytes [{offset}, {offset + nbytes})")
        return out

    def tensor(self, name: str, *, verify: bool = False) -> torch.Tensor:
        """A dense tensor, read into memory this process owns (writable; writes never reach the file)."""
        rec = self.tensor_records.get(name)
        if rec is None:
            raise MoepackError(f"the pack has no tensor {name!r}", path=self.path)
        data = torch.empty(rec.nbytes, dtype=torch.uint8)
        self._read_into(rec.shard, rec.offset, data, f"tensor {name!r}")
        if verify:
            self._check(data, rec.checksum, f"tensor {name!r}", rec.shard)
        return data.view(DTYPES[rec.dtype]).reshape(rec.shape)

    def expert_blob(self, layer: int, expert: int, *, verify: bool = False) -> torch.Tensor:
        """An expert's whole payload: one contiguous uint8 tensor, read once and kept until `release`, so
        later changes to the file cannot reach it; with `verify` its checksum is checked before it is used."""
        rec = self.expert(layer, expert)
        blob = self._blobs.get(rec.key)
        if blob is None:
            blob = torch.empty(rec.nbytes, dtype=torch.uint8)
            self._read_into(rec.shard, rec.offset, blob, f"expert {layer}.{expert}")
            self._blobs[rec.key] = blob
            self._verified.discard(rec.key)
        if verify and rec.key not in self._verified:
            try:
                self._check(blob, rec.checksum, f"expert {layer}.{expert}", rec.shard)
            except ChecksumError:
                self._blobs.pop(rec.key, None)
                raise
            self._verified.add(rec.key)
        return blob

    def read_expert_into(self, layer: int, expert: int, dst: torch.Tensor, *, verify: bool = True) -> torch.Tensor:
        """Read expert `layer.expert` into the contiguous CPU uint8 tensor `dst` (at least its size) with one
        positioned read, checking the checksum on every call when `verify`. Returns the filled prefix."""
        rec = self.expert(layer, expert)
        out = dst[: rec.nbytes]
        self._read_into(rec.shard, rec.offset, out, f"expert {layer}.{expert}")
        if verify:
            self._check(out, rec.checksum, f"expert {layer}.{expert}", rec.shard)
        return out

    def release(self, layer: int, expert: int) -> None:
        """Drop this process's copy of an expert (a later `expert_blob` reads and checks it again)."""
        self._blobs.pop((layer, expert), None)
        self._verified.discard((layer, expert))

    def expert(self, layer: int, expert: int) -> ExpertRecord:
        rec = self.expert_records.get((layer, expert))
        if rec is None:
            raise MoepackError(f"the pack has no expert {layer}.{expert}", path=self.path)
        return rec

    def verify(self) -> None:
        """Check every record's checksum (reads the whole pack once, one record at a time)."""
        records = [(t.shard, t.offset, t.nbytes, t.checksum, f"tensor {t.name!r}") for t in self.manifest.tensors]
        records += [(e.shard, e.offset, e.nbytes, e.checksum, f"expert {e.layer}.{e.expert}")
                    for e in self.manifest.experts]
        scratch = torch.empty(max((r[2] for r in records), default=0), dtype=torch.uint8)
        for shard, offset, nbytes, expected, what in records:
            data = scratch[:nbytes]
            self._read_into(shard, offset, data, what)
            self._check(data, expected, what, shard)

    def close(self) -> None:
        self._blobs = {}
        self._verified = set()
        fds, self._fds = self._fds, [None] * len(self._fds)
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

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


def check_pack(path: str | Path) -> dict:
    """Everything `run` relies on, as `moepack verify` reports it: the manifest and shards validate, the
    config gives a ModelSpec whose dense tensors and expert records are all in the manifest with the right
    shapes, every checksum matches, the tokenizer parses and fits the vocabulary, the calibration statistics
    (if any) are well formed, and every listed file is a regular, size-bounded file (strict JSON when it is a
    .json file). Raises the first typed error found."""
    from moepack.format.validate import parse_json

    with Pack(path) as pack:
        spec = pack.spec
        pack.verify()
        tok = pack.tokenizer()
        if "adaptive" in pack.manifest.meta:  # the profiled statistics `run --adaptive-k auto` etc. read
            from moepack.runtime.adaptive import AdaptiveCalibration

            AdaptiveCalibration.from_pack(pack).auto()
        for name in pack.manifest.files:
            data = pack.read_file(name)
            if name.endswith(".json") and name != TOKENIZER_NAME:
                parse_json(data, pack.path / name)
        return {"path": str(pack.path), "records": len(pack.manifest.tensors) + len(pack.manifest.experts),
                "family": spec.family, "layers": spec.num_layers, "experts": spec.num_experts,
                "files": len(pack.manifest.files), "tokenizer_tokens": None if tok is None else tok.get_vocab_size()}
