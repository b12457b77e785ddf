"""Typed errors. Every error a user can trigger is a MoepackError subclass whose message names
the file (or input) and the problem, so the CLI can print it without a traceback."""

from __future__ import annotations

from pathlib import Path


class MoepackError(Exception):
    """Base of every error moepack raises on purpose."""

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


# --- pack format -------------------------------------------------------------------------------
class PackFormatError(MoepackError):
    """The pack is malformed (base class of the specific format errors)."""


class BadMagicError(PackFormatError):
    """A manifest or shard does not start with the moepack magic."""


class UnsupportedVersionError(PackFormatError):
    """The pack was written by a format version this reader does not know."""


class TruncatedError(PackFormatError):
    """A shard is shorter than the manifest says."""


class OutOfRangeError(PackFormatError):
    """A record's byte range lies outside its shard, or sizes do not add up."""


class OverlapError(PackFormatError):
    """Two records share bytes."""


class ChecksumError(PackFormatError):
    """The bytes on disk do not match the recorded checksum."""


class UnsafePathError(PackFormatError):
    """A shard name would leave the pack directory."""


class ManifestError(PackFormatError):
    """manifest.json is missing, not JSON, or lacks required fields."""


# --- inputs ------------------------------------------------------------------------------------
class SourceError(MoepackError):
    """A checkpoint cannot be found or read."""


class UnsupportedModelError(MoepackError):
    """The checkpoint's model_type is not a supported MoE family."""


class CodecError(MoepackError):
    """A recipe or codec parameter is invalid."""


class BudgetError(MoepackError):
    """The memory budget is too small; the message states the minimum that would work."""


class KernelUnavailableError(MoepackError):
    """A requested kernel backend cannot be built or used here."""


class ConfigError(MoepackError):
    """An option has a value it cannot take, or needs another option it was given without."""


# --- added for hostile packs (issue 15) ------------------------------------------------------
class UnsafeFileError(UnsafePathError):
    """A pack file is a symbolic link, a FIFO, a device or another non-regular file, or is too large."""


class TokenizerError(PackFormatError):
    """The pack's tokenizer.json cannot be parsed, or does not fit the model."""


class ModelMismatchError(PackFormatError):
    """The manifest's records do not match the model its config describes (missing tensors or experts,
    wrong shapes)."""


class ModelConfigError(UnsupportedModelError):
    """A config.json value has the wrong type or is out of range (a non-integer head_dim, zero heads, ...)."""


# --- writing a pack (issue 15: writers that cannot destroy) ----------------------------------------
class PackWriteError(MoepackError):
    """The pack cannot be written at the output path (disk full, permission denied, read-only file system)."""


class OutputExistsError(PackWriteError):
    """The output path exists: a pack without --force, or something that is not a pack (never replaced)."""


class OutputInUseError(PackWriteError):
    """Another compress is writing the same output path right now (its lock file is held)."""
