"""A short, seeded run of the pack mutation fuzzer (tests/fuzz_packs.py; the long run is `just fuzz`):
every mutant runs correctly or is refused with a typed MoepackError, with no other exception type, no
signal, no hang, no pack that verify passes and run refuses, and no live mutant run on damaged weights."""

from __future__ import annotations

import pytest


def test_a_hundred_mutants_run_or_are_refused(tmp_path):
    pytest.importorskip("transformers")
    from fuzz_packs import KINDS, fuzz

    rep = fuzz(100, seed=7, families=["qwen2_moe"], root=tmp_path, timeout=30.0)
    failures = [(f["outcome"], f["plan"]["kind"], f["message"][:160]) for f in rep["failures"]]
    assert not failures, failures[:8]
    outcomes = rep["outcomes"]
    assert sum(outcomes.values()) == 100
    # the fuzzer really damages packs, and really runs the ones it leaves intact
    assert outcomes.get("refused", 0) >= 40 and outcomes.get("accepted_same", 0) >= 10, outcomes
    assert len(rep["by_kind"]) >= len(KINDS) * 2 // 3, sorted(rep["by_kind"])
