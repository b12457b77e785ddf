"""The local pack store: `moepack list`, `moepack rm NAME`, and `moepack download ALIAS` (a hub checkpoint
into the Hugging Face cache, where `compress ALIAS` finds it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from moepack.errors import MoepackError, SourceError


def store_packs() -> list[dict]:
    """Every pack in the store: name, path, model type, size on disk, expert ratio."""
    from moepack.format.publish import read_pack_manifest
    from moepack.source.resolve import pack_store

    store = pack_store()
    out = []
    for path in sorted(store.glob("*.moepack")) if store.is_dir() else []:
        manifest = read_pack_manifest(path)
        if manifest is None:
            continue
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink())
        experts = [e for e in manifest.get("experts", []) if isinstance(e, dict)]
        packed = sum(int(e.get("nbytes", 0)) for e in experts)
        source = sum(int(e.get("source_bytes", 0)) for e in experts)
        out.append({"name": path.name.removesuffix(".moepack"), "path": str(path),
                    "model_type": (manifest.get("model") or {}).get("model_type"), "bytes": size,
                    "ratio": round(source / packed, 2) if packed else None})
    return out


def list_packs(*, json_out: bool) -> None:
    from moepack.source.resolve import pack_store
    from moepack.units import format_size

    packs = store_packs()
    if json_out:
        print(json.dumps({"store": str(pack_store()), "packs": packs}, indent=1))
        return
    console = Console()
    if not packs:
        console.print(f"no packs in {pack_store()} (moepack compress MODEL puts them there)", highlight=False)
        return
    table = Table(title=f"packs in {pack_store()}", box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for col in ("name", "model", "size", "ratio"):
        table.add_column(col, justify="left" if col in ("name", "model") else "right", overflow="fold")
    for p in packs:
        table.add_row(p["name"], p["model_type"] or "?", format_size(p["bytes"]),
                      "" if p["ratio"] is None else f"{p['ratio']:.2f}x")
    console.print(table)


def remove_pack(name: str, *, yes: bool) -> None:
    """Remove a pack from the store (or at a path), only if it is a moepack pack and nobody is writing it."""
    from moepack.format.publish import OutputLock, check_output, read_pack_manifest, remove_tree
    from moepack.source.resolve import resolve_pack

    path = resolve_pack(name)
    if path.is_symlink() or read_pack_manifest(path) is None:
        raise MoepackError("is not a moepack pack; moepack rm removes only packs", path=path)
    check_output(path, force=True)  # refuses a pack folder holding files the pack does not list
    if not yes:
        import typer

        if not typer.confirm(f"remove {path}?"):
            raise MoepackError("nothing removed", path=path)
    with OutputLock(path):
        if not remove_tree(path):
            raise MoepackError("could not be removed completely (permissions?)", path=path)
    Console().print(f"removed {path}", highlight=False)


def download(name: str) -> None:
    """Fetch a hub checkpoint (alias or repo id) into the Hugging Face cache, saying how large it is first."""
    from moepack.source.resolve import _HUB_PATTERNS, repo_id_for
    from moepack.units import format_size

    repo = repo_id_for(name)
    if repo is None:
        from moepack.source.resolve import ALIASES

        raise SourceError(f"{name!r} is neither a Hugging Face repo id (org/name) nor a known alias "
                          f"({', '.join(sorted(ALIASES))})")
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, snapshot_download

    console = Console(stderr=True)
    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - offline, auth, missing repo: say which
        raise SourceError(f"cannot reach {repo} on the Hugging Face hub ({type(exc).__name__}); "
                          f"`moepack download {name}` needs network access") from None
    files = [s for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in _HUB_PATTERNS)]
    total = sum(s.size or 0 for s in files)
    console.print(f"{repo}: {len(files)} files, {format_size(total)}", highlight=False)
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    path = snapshot_download(repo, allow_patterns=_HUB_PATTERNS, cache_dir=cache_dir)
    console.print(f"downloaded to {Path(path)}; compress it with `moepack compress {name}`", highlight=False)
