"""Where a model comes from and where its pack goes.

SRC may be a local checkpoint folder, a Hugging Face repo id (`mistralai/Mixtral-8x7B-v0.1`), or an
alias (`mixtral-8x7b`). Repo ids go through huggingface-hub's cache, which honours HF_HUB_OFFLINE and
HF_HUB_CACHE, so a prepared cache works without a network."""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

from moepack.errors import MoepackError, SourceError
from moepack.format.publish import recover_replace
from moepack.format.reader import is_pack

ALIASES = {
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen2-57b-a14b": "Qwen/Qwen2-57B-A14B",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
_HUB_IGNORE = ["original/*", "metal/*"]  # gpt-oss: the same weights again in OpenAI's own and Metal formats


def pack_store() -> Path:
    """The local pack store: $MOEPACK_HOME/packs, default ~/.cache/moepack/packs."""
    home = os.environ.get("MOEPACK_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "moepack")
    return Path(home) / "packs"


def repo_id_for(name: str) -> str | None:
    """The hub repo id that a name means, or None when it is no alias and no repo id."""
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    return name if _REPO_ID.match(name) else None


def pack_slug(name: str) -> str:
    """File-system name of a model in the store: the alias if it is one, else the repo id with '--'."""
    low = name.lower()
    if low in ALIASES:
        return low
    for alias, repo in ALIASES.items():
        if repo.lower() == low:
            return alias
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip("/"))


def default_pack_path(src: str) -> Path:
    """Where `compress SRC` writes when no -o is given."""
    local = Path(src)
    slug = local.resolve().name if local.exists() else pack_slug(src)
    return pack_store() / f"{slug}.moepack"


def resolve_source(src: str) -> Path:
    """A local checkpoint folder for SRC, downloading (or finding in the cache) a hub repo."""
    local = Path(src).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceError("expected a checkpoint folder (config.json + *.safetensors)", path=local)
        return local
    repo = repo_id_for(src)
    if repo is None:
        raise SourceError(f"{src!r} is neither a folder, a Hugging Face repo id (org/name) nor a known alias "
                          f"({', '.join(sorted(ALIASES))})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        # the environment is read here, not at huggingface-hub's import, so a changed HF_HUB_CACHE applies
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        return Path(snapshot_download(repo, allow_patterns=_HUB_PATTERNS, ignore_patterns=_HUB_IGNORE,
                                      local_files_only=offline, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise SourceError(f"{repo} is not in the Hugging Face cache and the hub cannot be reached "
                          f"(offline mode: {offline}); download it once with network access") from None
    except Exception as exc:  # network, auth, missing repo: say which and keep the cause
        raise SourceError(f"cannot fetch {repo} from the Hugging Face hub: {exc}") from None


def resolve_pack(name: str) -> Path:
    """A pack path for `run`/`inspect`/`eval`/`verify`: a path to a pack, or a model name whose pack is in the
    store. A replace that a killed compress left half done is repaired first, and said on stderr."""
    local = Path(name).expanduser()
    _recover(local)
    if local.exists():
        return local
    for candidate in (pack_store() / f"{pack_slug(name)}.moepack", pack_store() / f"{name}.moepack"):
        _recover(candidate)
        if is_pack(candidate):
            return candidate
    known = sorted(p.name for p in pack_store().glob("*.moepack")) if pack_store().is_dir() else []
    hint = f"packs in the store ({pack_store()}): {', '.join(known)}" if known else f"the store {pack_store()} is empty"
    raise MoepackError(f"no pack for {name!r}: not a path, and no compressed pack of that model ({hint}). "
                       f"Run `moepack compress {name}` first.")


def _recover(path: Path) -> None:
    """moepack.format.publish.recover_replace, saying what it did (cheap when nothing was left behind)."""
    msg = recover_replace(path)
    if msg:  # on its own lines, within 80 columns, paths never cut
        print(textwrap.fill(f"note: {msg}", width=79, break_long_words=False, break_on_hyphens=False),
              file=sys.stderr)
