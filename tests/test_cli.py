"""The CLI: thin, fast to start, clear errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.units import parse_size

runner = CliRunner()


def test_help_does_not_import_heavy_modules():
    code = "import sys, moepack.cli.app; print(sorted(m for m in ('torch', 'scipy', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_compress_inspect_run_json(baby, tmp_path):
    out = tmp_path / "p.moepack"
    res = runner.invoke(app, ["compress", str(baby("qwen2_moe")), "-o", str(out), "--recipe", "q4g64", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["ratio"] > 1 and summary["path"] == str(out)
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "q4g64" in res.output
    res = runner.invoke(app, ["run", str(out), "--prompt", "Now is the winter", "-n", "5", "--json", "--vram", "64MB",
                              "--context", "64"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    for field in ("text", "tokens", "ttft_s", "decode_tokens_per_s", "cache_hit_rate", "bytes_moved_per_token",
                  "peak_rss_bytes"):
        assert field in data, field
    res = runner.invoke(app, ["run", str(out), "--prompt", "Now", "-n", "3", "--stats"])
    assert res.exit_code == 0 and "no budget" in res.output and "cache hit rate" not in res.output
    assert "cache policy" in res.output  # the settings in force
    res = runner.invoke(app, ["run", str(out), "--prompt", "Now", "-n", "3", "--stats", "--vram", "64MB",
                              "--context", "64"])
    assert res.exit_code == 0 and "cache hit rate" in res.output
    res = runner.invoke(app, ["run", str(out), "--prompt", "Now is the winter", "-n", "4", "--json", "--vram", "64MB",
                              "--context", "64", "--dtype", "bfloat16", "--cache-policy", "reuse", "--prefetch", "fate",
                              "--prefetch-min-prob", "0", "--adaptive-k", "0.9", "--fallback", "0.8"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["prefetch"] == "fate"
    res = runner.invoke(app, ["run", str(out), "--prompt", "x", "--dtype", "int3"])
    assert res.exit_code == 2 and "--dtype takes one of" in res.output
    res = runner.invoke(app, ["run", str(out), "--prompt", "x", "--adaptive-k", "0.9", "--fallback", "2"])
    assert res.exit_code == 2 and "fallback" in res.output


def test_errors_are_one_line_without_traceback(tmp_path):
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing.moepack")])
    assert res.exit_code == 2
    assert "error:" in res.output and "Traceback" not in res.output
    (tmp_path / "bad.moepack").mkdir()
    res = runner.invoke(app, ["run", str(tmp_path / "bad.moepack"), "--prompt", "x"])
    assert res.exit_code == 2 and "manifest.json is missing" in res.output


def test_sizes_accept_units():
    assert parse_size("11GB") == 11 * 10**9
    assert parse_size("11GiB") == 11 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5 kib") == 1536
    assert parse_size(4096) == 4096
    import pytest

    from moepack.errors import MoepackError

    with pytest.raises(MoepackError, match="cannot read size"):
        parse_size("eleven gigs")


def test_runtime_imports_stay_light():
    """moepack.runtime imports only torch, numpy, safetensors, tokenizers and the pack reader."""
    code = ("import sys, moepack.runtime.api, moepack.runtime.executor;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('scipy', 'transformers', 'typer', 'rich', "
            "'huggingface_hub', 'matplotlib') or m.startswith(('moepack.compress', 'moepack.profile', 'moepack.plan', "
            "'moepack.source', 'moepack.cli'))];"
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_peak_rss_is_this_process_not_a_parent():
    """A child started from a process with a large peak must report its own, smaller peak."""
    code = "from moepack.runtime.stats import peak_rss_bytes; print(peak_rss_bytes())"
    big = bytearray(400 << 20)  # this process: +400 MB resident
    big[::4096] = b"\x01" * len(big[::4096])
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del big
    assert 0 < child < 300 << 20


def test_auto_adaptive_settings_from_a_calibrated_pack(baby, tmp_path):
    from moepack.profile import default_calibration_text

    calib = tmp_path / "calib.txt"
    calib.write_text(default_calibration_text())
    out = tmp_path / "cal.moepack"
    res = runner.invoke(app, ["compress", str(baby("mixtral")), "-o", str(out), "--recipe", "q4g64",
                              "--calib", str(calib), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    rep = json.loads(res.output)
    keeps = [e["auto_keep"] for e in rep["experts"]]
    assert all(k is not None and 0 < k <= 1 for k in keeps) and rep["auto"]["scale"] >= 0
    per_expert = runner.invoke(app, ["inspect", str(out), "--experts"]).output
    assert "keep" in per_expert and f"{keeps[0]:.2g}" in per_expert
    res = runner.invoke(app, ["run", str(out), "--prompt", "Now is the winter", "-n", "4", "--json", "--vram", "64MB",
                              "--context", "64", "--adaptive-k", "auto", "--fallback", "auto",
                              "--sparse-channels", "auto", "--partial-loads", "--cache-policy", "reuse", "--bypass"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["static_bytes_per_token"] is not None and data["belady_bytes_per_token"] is not None
    assert data["streamed"] >= 0 and data["partial_loads"] >= 0  # bypassed misses: whole, or the kept rows
