"""Checksums of byte ranges (xxh3-64: ~10 GB/s, so verifying an expert on load is cheap)."""

from __future__ import annotations

import xxhash


def checksum(data) -> str:
    """Hex xxh3-64 digest of a bytes-like object (bytes, memoryview, contiguous numpy/uint8 view)."""
    return xxhash.xxh3_64_hexdigest(data)


class RunningChecksum:
    """Incremental digest for a record written in several pieces."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
