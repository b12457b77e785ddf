"""Calibration text: the embedded default set or a user file, tokenised with the checkpoint's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from moepack.errors import MoepackError, SourceError

DEFAULT_SEQ_LEN = 512  # tokens per calibration window
DEFAULT_MAX_TOKENS = 16384  # calibration tokens used at most (the rest of a long file is ignored)
MIN_TOKENS = 16


@dataclass(frozen=True)
class Calibration:
    windows: torch.Tensor  # [B, T] token ids (non-overlapping windows of the text)
    source: str  # "embedded" or the file path

    @property
    def tokens(self) -> int:
        return self.windows.numel()


def default_calibration_text() -> str:
    """A few KB of public-domain English prose embedded in the package (moepack/profile/data/calib.txt)."""
    return resources.files("moepack.profile").joinpath("data/calib.txt").read_text(encoding="utf-8")


def load_tokenizer(checkpoint_dir: str | Path):
    """The checkpoint's `tokenizer.json` (Hugging Face tokenizers)."""
    path = Path(checkpoint_dir) / "tokenizer.json"
    if not path.is_file():
        raise SourceError("profiling needs the checkpoint's tokenizer.json to tokenise the calibration text",
                          path=Path(checkpoint_dir))
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def windows_of(ids: list[int], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [B, seq_len] of `ids` (the tail shorter than a window is dropped, unless the
    text is shorter than one window: then one window of all of it)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < MIN_TOKENS:
        raise MoepackError(f"calibration text has {len(ids)} tokens; at least {MIN_TOKENS} are needed")
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_calibration(checkpoint_dir: str | Path, calib: str | Path | None = None, *,
                     seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                     max_position: int | None = None) -> Calibration:
    """Tokenise `calib` (a text file; None: the embedded set) into windows for profiling."""
    if calib is None:
        text, source = default_calibration_text(), "embedded"
    else:
        path = Path(calib).expanduser()
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise MoepackError(f"cannot read calibration text: {exc.strerror}", path=path) from None
        source = str(path)
    if max_position is not None:
        seq_len = min(seq_len, max_position)
    ids = load_tokenizer(checkpoint_dir).encode(text).ids
    return Calibration(windows_of(ids, seq_len, max_tokens), source)
