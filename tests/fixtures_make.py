"""Regenerate the pinned format fixtures: python tests/fixtures_make.py (only with a format version bump)."""

import shutil
from pathlib import Path

from packbuilder import build_tiny_pack

if __name__ == "__main__":
    out = Path(__file__).parent / "fixtures" / "tiny-v1.moepack"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(exist_ok=True)
    build_tiny_pack(out)
    print(out)
