"""A Hugging Face checkpoint folder: config.json plus single or sharded safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moepack.errors import SourceError
from moepack.source.safetensors_file import SafetensorsFile

# Files copied verbatim into the pack when present, so the runtime can tokenize and report.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)


class Checkpoint:
    def __init__(self, path: str | Path, *, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise SourceError("no config.json: not a Hugging Face checkpoint folder", path=self.path)
        try:
            self.config: dict = json.loads(cfg.read_text())
        except ValueError as exc:
            raise SourceError(f"config.json is not valid JSON: {exc}", path=cfg) from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            hint = " (PyTorch .bin checkpoints are not read: they need pickle)" if list(self.path.glob("*.bin")) else ""
            raise SourceError(f"no .safetensors files{hint}", path=self.path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            wanted = set(json.loads(index.read_text())["weight_map"].values())
            files = [f for f in files if f.name in wanted]
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for n in f.names():
                self._where[n] = f

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        """(dtype, shape, nbytes) without reading data."""
        return self._file(name).info(name)

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """A tensor by name, or with `index` its slice along the first axis only (see SafetensorsFile.read)."""
        return self._file(name).read(name, index)

    def read_ref(self, ref) -> torch.Tensor:
        """One expert projection [I, H] from an `ExpertTensorRef`: for a fused [E, ...] tensor only the
        expert's slice is read (and its MXFP4 scales' slice), so memory stays at one expert per projection."""
        scales = None if ref.scales is None else self.read(ref.scales, ref.index)
        return ref.local().extract(self.read(ref.name, ref.index), scales)

    @property
    def largest_read(self) -> int:
        """Bytes of the largest single tensor read so far, over every file."""
        return max((f.largest_read for f in self.files), default=0)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise SourceError(f"tensor {name!r} is not in the checkpoint", path=self.path) from None

    def aux_files(self) -> dict[str, bytes]:
        return {n: (self.path / n).read_bytes() for n in AUX_FILES if (self.path / n).is_file()}

    @property
    def total_bytes(self) -> int:
        return sum(self.info(n)[2] for n in self._where)
