"""Tensor-by-tensor reading of .safetensors files with plain positioned reads.

safetensors' own `safe_open` maps the file; the pages it touches then count towards the process's RSS
until the kernel drops them, so a multi-GB checkpoint would show multi-GB RSS. Reading each tensor with
`readinto` keeps peak memory at one tensor plus the compressor's working set."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from moepack.errors import SourceError

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise SourceError("file too short to be safetensors", path=self.path)
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER:
                    raise SourceError(f"safetensors header of {n} bytes is implausibly large", path=self.path)
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read safetensors header: {exc}", path=self.path) from None
        self.data_start = 8 + n
        self.largest_read = 0  # bytes of the largest single read so far (tests check bounded reading)
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        size = self.path.stat().st_size
        for name, info in header.items():
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not 0 <= begin <= end <= size - self.data_start:
                raise SourceError(f"tensor {name!r} lies outside the file", path=self.path)
            self.entries[name] = (dtype, shape, begin, end)

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        dtype, shape, begin, end = self.entries[name]
        if dtype not in DTYPES:
            raise SourceError(f"tensor {name!r} has dtype {dtype}, which moepack cannot read "
                              f"(supported: {', '.join(DTYPES)})", path=self.path)
        return DTYPES[dtype], shape, end - begin

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or with `index` only its slice t[index] along the first axis (one positioned read of
        that slice's bytes: an expert of a fused [E, ...] tensor without reading the others)."""
        dtype, shape, nbytes = self.info(name)
        _, _, begin, _ = self.entries[name]
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise SourceError(f"tensor {name!r} of shape {list(shape)} has no slice {index}", path=self.path)
            nbytes //= shape[0]
            begin += index * nbytes
            shape = shape[1:]
        self.largest_read = max(self.largest_read, nbytes)
        out = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.data_start + begin)
            got = fh.readinto(memoryview(out.numpy()))
        if got != nbytes:
            raise SourceError(f"tensor {name!r} is truncated ({got} of {nbytes} bytes)", path=self.path)
        return out.view(dtype).reshape(shape)
