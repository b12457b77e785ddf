"""Benchmark plumbing that picks inputs and renders tables: the trained toy Mixtral is chosen among the
trained toys of every family in the cache, and the per-family runtime table compares each family's moepack
rows with that family's own transformers row."""

from __future__ import annotations

import json
import os
import re

import pytest

common = pytest.importorskip("benchmarks.peers.common")
families = pytest.importorskip("benchmarks.bench_runtime_families")


def _toy(cache, name: str, model_type: str, *, mtime: float, finished: bool = True):
    d = cache / "toy-model" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    if finished:
        (d / "moepack_toy.json").write_text("{}")
    os.utime(d, (mtime, mtime))
    return d


def test_toy_mixtral_skips_newer_toys_of_other_families(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPACK_CACHE", str(tmp_path))
    assert common.toy_mixtral() is None
    old = _toy(tmp_path, "small-aaa", "mixtral", mtime=1_000)
    newer = _toy(tmp_path, "small-bbb", "mixtral", mtime=2_000)
    _toy(tmp_path, "qwen3-docs-ccc", "qwen3_moe", mtime=3_000)  # the newest trained toy, another family
    _toy(tmp_path, "small-ddd", "mixtral", mtime=4_000, finished=False)  # still training: no meta file
    broken = tmp_path / "toy-model" / "small-eee"
    broken.mkdir()
    (broken / "moepack_toy.json").write_text("{}")
    (broken / "config.json").write_text("{not json")
    os.utime(broken, (5_000, 5_000))
    assert common.toy_mixtral() == newer
    large = _toy(tmp_path, "large-fff", "mixtral", mtime=500)  # the large variant wins over newer small ones
    assert common.toy_mixtral() == large
    assert old != newer


def _result(system: str, label: str, decode: float) -> dict:
    r = {"system": system, "label": label, "threads": 1, "decode_tps": decode, "ttft_s": 0.25,
         "peak_rss_bytes": 5e8}
    if system == "moepack":
        r.update(expert_slots=None, total_experts=96, cache_hit_rate=1.0, bytes_moved_per_token=0)
    return r


def _measurement(tmp_path, family: str, transformers_tps: float, moepack_tps: float) -> dict:
    ck = tmp_path / family
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"x" * 1000)
    packs = {}
    for recipe in ("bf16", "q4g128"):
        packs[recipe] = tmp_path / f"{family}.{recipe}.moepack"
        packs[recipe].write_bytes(b"x" * 500)
    results = [_result("transformers", "transformers bf16, whole", transformers_tps),
               _result("moepack", "moepack bf16 pack, whole", moepack_tps),
               {"error": "exit 1: boom", "system": "moepack", "label": "moepack q4g128 pack, whole",
                "threads": 1}]
    return {"family": family, "ck": str(ck), "packs": {k: str(v) for k, v in packs.items()},
            "results": results, "prompt_tokens": 83, "load": (1.5, 2.5), "threads": [1], "repeats": 3,
            "new_tokens": 32, "fraction": 0.25}


def test_family_rows_are_compared_with_their_own_transformers_row(tmp_path):
    ms = [_measurement(tmp_path, "deepseek_v3", 10.0, 20.0), _measurement(tmp_path, "gpt_oss", 40.0, 10.0)]
    text = families.body(ms)
    rows = [ln for ln in text.splitlines() if ln.startswith("| DeepSeek-V3: ") or ln.startswith("| GPT-OSS: ")]
    assert len(rows) == 6
    assert re.search(r"^\| DeepSeek-V3: moepack bf16 pack, whole \| 1 \| 500 B \| 250 \| 20\.00 \| 2\.00x \|",
                     text, re.M)
    assert re.search(r"^\| GPT-OSS: moepack bf16 pack, whole \| 1 \| 500 B \| 250 \| 10\.00 \| 0\.25x \|", text, re.M)
    assert re.search(r"^\| GPT-OSS: transformers bf16, whole \| 1 \| 1\.00 kB \| .* \| 1\.00x \|", text, re.M)
    assert "| GPT-OSS: moepack q4g128 pack, whole | 1 | - |" in text and "failed: exit 1: boom" in text
    assert "load average 1.5 at the start and 2.5 at the end" in text
    assert "2-thread rows" not in text  # one thread count measured
    assert "- DeepSeek-V3 (transformers' DeepseekV3ForCausalLM)" in text
    assert "- GPT-OSS (transformers' GptOssForCausalLM)" in text


def test_unknown_family_is_refused():
    with pytest.raises(SystemExit):
        families.main(["--family", "mixtral", "--no-write"])
