"""The user's own examples, as written: an alias resolved through a (prepared, offline) hub cache, a default
output location in the pack store, and `run` / `inspect` by model name."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.errors import MoepackError, SourceError
from moepack.source import ALIASES, default_pack_path, resolve_pack, resolve_source


@pytest.fixture
def hub(baby, tmp_path, monkeypatch):
    """An offline Hugging Face cache holding mistralai/Mixtral-8x7B-v0.1 (a baby checkpoint in disguise)."""
    cache = tmp_path / "hf"
    repo = cache / "models--mistralai--Mixtral-8x7B-v0.1"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(baby("mixtral"), snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOEPACK_HOME", str(tmp_path / "home"))
    return snap


def test_alias_resolves_through_the_hub_cache(hub):
    assert ALIASES["mixtral-8x7b"] == "mistralai/Mixtral-8x7B-v0.1"
    assert resolve_source("mixtral-8x7b").resolve() == hub.resolve()
    assert resolve_source("mistralai/Mixtral-8x7B-v0.1").resolve() == hub.resolve()


def test_repo_missing_from_an_offline_cache(hub):
    with pytest.raises(SourceError, match="not in the Hugging Face cache"):
        resolve_source("qwen3-30b-a3b")


def test_user_examples_work_as_written(hub, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["compress", "mixtral-8x7b", "--target-ratio", "9"])
    assert res.exit_code == 0, res.output
    out = default_pack_path("mixtral-8x7b")
    assert out == tmp_path / "home" / "packs" / "mixtral-8x7b.moepack"
    assert str(out) in res.output.replace("\n", "")  # the default location is reported
    assert resolve_pack("mixtral-8x7b") == out

    res = runner.invoke(app, ["inspect", "mixtral-8x7b", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["ratio"] >= 9 and {"source_bytes", "pack_bytes", "experts"} <= set(rep)
    assert {"layer", "expert", "bytes", "recipe"} <= set(rep["experts"][0])

    res = runner.invoke(app, ["run", "mixtral-8x7b", "--vram", "11GB", "--prompt", "To be", "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["tokens"] == 4


def test_unknown_pack_name_says_what_to_do(hub):
    with pytest.raises(MoepackError, match="moepack compress olmoe-1b-7b"):
        resolve_pack("olmoe-1b-7b")
