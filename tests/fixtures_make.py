"""Regenerate the pinned format fixture of the current version: python tests/fixtures_make.py (only with a
format version bump). Older versions' fixtures (tiny-v1.moepack) stay as written, to prove they still read."""

import shutil
from pathlib import Path

from packbuilder import build_tiny_pack

if __name__ == "__main__":
    from moepack.format.constants import FORMAT_VERSION

    out = Path(__file__).parent / "fixtures" / f"tiny-v{FORMAT_VERSION}.moepack"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(exist_ok=True)
    build_tiny_pack(out)
    print(out)
