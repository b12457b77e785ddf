"""The Mixtral-width peer table (benchmarks/peers/wide.py): the summary lines that scripts read, and the
bits-per-weight count of a pack's experts."""

from __future__ import annotations

import re

import pytest

wide = pytest.importorskip("benchmarks.peers.wide")


def _row(system: str, decode: float, ttft: float) -> dict:
    return {"system": system, "label": system, "decode_tps": decode, "ttft_s": ttft, "peak_rss_bytes": 1e9,
            "weights_path": "/nonexistent", "bpw": 4.25, "cpu_s_per_run": ttft * 2}


def _measurement(divisor: int) -> dict:
    rows = [
        {"recipe": "q4g128", "quant": "Q4_K_M", "threads": 1, "repeats": 3,
         "moepack": _row("moepack", 12.0, 10.0), "llamacpp": _row("llamacpp", 10.0, 8.0)},
        {"recipe": "q4g128", "quant": "Q4_K_M", "threads": 2, "repeats": 3,
         "moepack": _row("moepack", 15.0, 5.0), "llamacpp": _row("llamacpp", 20.0, 6.0)},
        {"recipe": "q2g64", "quant": "Q2_K", "threads": 1, "repeats": 1,
         "moepack": _row("moepack", 1.0, 1.0), "llamacpp": {"error": "exit 1: boom", "label": "llama.cpp Q2_K",
                                                             "weights_path": "/nonexistent", "bpw": None}},
    ]
    return {"ck": "/x/mixtral-width-d1-l2-v512-bfloat16", "divisor": divisor, "rows": rows, "notes": [],
            "repeats": (3, 1), "new_tokens": 16, "prompt_tokens": 512, "threads": [1, 2], "load": (1.0, 1.0),
            "cpu": "test cpu; 2 cores; avx2", "short_warmup": True}


def test_summary_lines_have_the_exact_form_scripts_read():
    lines = wide.summary_lines(_measurement(1))
    assert lines[0] == "mixtral-width decode vs llama.cpp Q4_K_M: 1.20x at 1 thread, 0.75x at 2 threads"
    # llama.cpp's time over moepack's, the lower of the thread counts: 8/10 = 0.80 at 1, 6/5 = 1.20 at 2
    assert lines[1] == "mixtral-width TTFT vs llama.cpp Q4_K_M: 0.80x"
    assert re.fullmatch(r"mixtral-width decode vs llama\.cpp Q4_K_M: \d+\.\d\dx at 1 thread, \d+\.\d\dx at 2 threads",
                        lines[0])


def test_scaled_runs_do_not_claim_the_full_width_lines():
    text = wide.render_wide(_measurement(4))
    assert "mixtral-width/4 decode vs llama.cpp Q4_K_M: 1.20x at 1 thread" in text
    assert not re.search(r"^mixtral-width decode", text, re.M)


def test_render_reports_a_failed_system_and_ratios():
    text = wide.render_wide(_measurement(1))
    assert "failed: exit 1: boom" in text
    assert "| 1.20x | 0.80x |" in text  # decode and TTFT ratios on moepack's q4 row at 1 thread
    assert "2 (q4g128)" not in text and "3 (q4g128)/1 (q2g64)" in text


def test_pack_expert_bits_per_weight(tmp_path):
    from moepack.compress import compress
    from moepack.testing.checkpoints import make_baby_checkpoint

    ck = make_baby_checkpoint("mixtral", tmp_path / "baby", dtype="bfloat16")
    q4 = tmp_path / "q4.moepack"
    compress(str(ck), q4, recipe="q4g128", rtn=True, force=True)
    bf16 = tmp_path / "bf16.moepack"
    compress(str(ck), bf16, recipe="bf16", force=True)
    assert wide.pack_expert_bpw(bf16) == pytest.approx(16.0)
    assert 4.0 < wide.pack_expert_bpw(q4) <= 4.5  # 4-bit codes plus a scale and a zero per group of 128


def test_merged_runs_report_the_load_range_of_both():
    """Rows merged from a second run (--wide-merge) carry the load range over both runs, not the first's."""
    old = {**_measurement(1), "load": (0.2, 1.4)}
    new = {**_measurement(1), "load": (3.5, 4.4), "notes": []}
    new["rows"] = [p for p in new["rows"] if p["recipe"] == "q4g128"]
    merged = wide.merge_pairs(old, new)
    assert merged["load"] == (0.2, 4.4)
    text = wide.render_wide(merged)
    assert "load average from 0.2 to 4.4 over the runs" in text and "measured again" in text
