"""What a person sees: every table fits 80 columns without cut-off cells, and the store commands
(--version, list, rm) behave."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moepack.cli.app import app

runner = CliRunner()


def fits(output: str) -> None:
    for line in output.splitlines():
        assert len(line) <= 80, f"{len(line)} columns: {line!r}"
    assert "…" not in output, output


@pytest.fixture(scope="module")
def pack(baby, tmp_path_factory):
    from moepack.compress import compress

    out = tmp_path_factory.mktemp("term") / "p.moepack"
    compress(str(baby("mixtral")), out, recipe="up=q2g32,gate=q4g32,down=q4g32")
    return out


def test_tables_fit_80_columns(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("MOEPACK_HOME", str(tmp_path / "home"))
    for args in (["inspect", str(pack)], ["inspect", str(pack), "--experts"],
                 ["run", str(pack), "-p", "Now is", "-n", "3", "--stats", "--vram", "64MB", "--context", "64",
                  "--adaptive-k", "0.9", "--sparse-channels", "0.8"],
                 ["plan", str(pack), "--vram", "64MB", "--context", "64", "--link-gbps", "2",
                  "--device-tflops", "1", "--trace-prompts", "1"]):
        res = runner.invoke(app, args, terminal_width=80)
        assert res.exit_code == 0, (args, res.output)
        fits(res.output)
    per_layer = runner.invoke(app, ["inspect", str(pack)]).output
    assert "q2g32/q4g32/q4g32" in per_layer and "bits/w" in per_layer and "--experts" in per_layer
    stats = runner.invoke(app, ["run", str(pack), "-p", "Now is", "-n", "3", "--stats", "--vram", "64MB",
                                "--context", "64", "--adaptive-k", "0.9"]).output
    assert "prefetch_used" not in stats and "little_token_share" not in stats  # labelled in words
    assert "tokens run on the little half" in stats and "AUTO" not in stats


def test_version_help_list_and_rm(pack, tmp_path, monkeypatch):
    import shutil

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("moepack ")
    assert runner.invoke(app, ["-h"]).exit_code == 0
    monkeypatch.setenv("MOEPACK_HOME", str(tmp_path / "home"))
    store = tmp_path / "home" / "packs"
    store.mkdir(parents=True)
    shutil.copytree(pack, store / "baby.moepack")
    (store / "notes.moepack").mkdir()  # not a pack: neither listed nor removable
    (store / "notes.moepack" / "mine.txt").write_text("keep me")
    data = json.loads(runner.invoke(app, ["list", "--json"]).output)
    assert [p["name"] for p in data["packs"]] == ["baby"] and data["packs"][0]["model_type"] == "mixtral"
    res = runner.invoke(app, ["rm", str(store / "notes.moepack"), "--yes"])
    assert res.exit_code == 2 and "not a moepack pack" in res.output
    assert (store / "notes.moepack" / "mine.txt").read_text() == "keep me"
    res = runner.invoke(app, ["rm", "baby"], input="n\n")
    assert res.exit_code == 2 and (store / "baby.moepack").exists()
    res = runner.invoke(app, ["rm", "baby", "--yes"])
    assert res.exit_code == 0 and not (store / "baby.moepack").exists()
    assert json.loads(runner.invoke(app, ["list", "--json"]).output)["packs"] == []


def test_download_offline_names_the_repo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(app, ["download", "mixtral-8x7b"])
    assert res.exit_code == 2 and "Mixtral-8x7B" in res.output and "network" in res.output


def test_ctrl_c_prints_the_partial_text_and_exits_130(pack):
    """SIGINT during generation: the text so far is kept, then exit code 130 (as a shell expects)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "moepack.cli.app", "run", str(pack), "-p", "Now is the",
                             "-n", "4000", "--context", "4096"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = proc.stdout.read(len("Now is the"))  # the prompt is echoed once generation starts
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert first == b"Now is the" and len(out) > 0 and b"interrupted" in err
    assert b"Traceback" not in err
