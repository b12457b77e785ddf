"""compress end to end: every family, uniform recipes, the hub cache, atomicity, determinism, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from moepack.codecs import decode, parse_recipe
from moepack.compress import compress, load_expert
from moepack.errors import CodecError, OutputExistsError, SourceError, UnsupportedModelError
from moepack.format import Pack, projection_parts
from moepack.source import Checkpoint


def digest_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_pack_holds_every_tensor_exactly(baby, tmp_path, family):
    src = baby(family)
    report = compress(str(src), tmp_path / "p.moepack")
    ckpt = Checkpoint(src)
    from moepack.arch import adapter_for

    with Pack(report.path, verify=True) as pack:
        adapter = adapter_for(pack.spec)
        assert report.ratio == pytest.approx(1.0)
        for name in pack.tensor_records:  # dense parts are stored verbatim
            assert torch.equal(pack.tensor(name), ckpt.read(name)), name
        for rec in pack.manifest.experts:
            want = load_expert(ckpt, adapter, rec.layer, rec.expert)
            blob = pack.expert_blob(rec.layer, rec.expert)
            for proj, prec in rec.projections.items():
                got = decode(projection_parts(blob, prec), parse_recipe(prec.recipe), prec.shape, dtype=want[proj].dtype)
                assert torch.equal(got, want[proj]), (rec.key, proj)
        n_tensors = len(pack.tensor_records) + 3 * len(pack.manifest.experts)
        assert n_tensors == len(ckpt.names())  # nothing dropped, nothing invented
        assert {"config.json", "tokenizer.json"} <= set(pack.manifest.files)


def test_recipe_per_projection_and_reported_ratio(baby, tmp_path):
    report = compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="up=q2g32,gate=q4g32,down=q4g64")
    with Pack(report.path) as pack:
        rec = pack.manifest.experts[0]
        assert {p: r.recipe for p, r in rec.projections.items()} == {"up": "q2g32", "gate": "q4g32", "down": "q4g64"}
        assert all(0 < r.error < 0.5 for r in rec.projections.values())
    assert report.ratio == pytest.approx(report.source_expert_bytes / report.pack_expert_bytes)
    assert report.ratio > 6  # fp32 source: ~10 bits/weight -> > 6x


def test_target_ratio_picks_the_most_faithful_uniform_recipe_that_reaches_it(baby, tmp_path):
    report = compress(str(baby("qwen3_moe")), tmp_path / "p.moepack", target_ratio=9, uniform=True)
    assert report.ratio >= 9
    lower = compress(str(baby("qwen3_moe")), tmp_path / "q.moepack", target_ratio=6, uniform=True)
    assert 6 <= lower.ratio < report.ratio


def test_unreachable_target_ratio_is_a_clear_error(baby, tmp_path):
    with pytest.raises(CodecError, match="no uniform recipe reaches ratio 500"):
        compress(str(baby("mixtral")), tmp_path / "p.moepack", target_ratio=500, uniform=True)
    assert not (tmp_path / "p.moepack").exists()


def test_compress_is_deterministic(baby, tmp_path):
    a = compress(str(baby("olmoe")), tmp_path / "a.moepack", recipe="2:4+q4g32").path
    b = compress(str(baby("olmoe")), tmp_path / "b.moepack", recipe="2:4+q4g32").path
    assert digest_dir(a) == digest_dir(b)


def test_interrupted_compress_leaves_no_pack(baby, tmp_path, monkeypatch):
    import moepack.compress as mod

    calls = {"n": 0}
    real = mod.encode

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="q4g32")
    assert list(tmp_path.iterdir()) == []  # neither the pack nor its temporary directory


def test_existing_pack_needs_force(baby, tmp_path):
    out = compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="q4g32").path
    before = digest_dir(out)
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        compress(str(baby("mixtral")), out, recipe="q2g32")
    assert digest_dir(out) == before
    compress(str(baby("mixtral")), out, recipe="q2g32", force=True)
    assert digest_dir(out) != before
    with Pack(out, verify=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.moepack"]  # no old pack, partial or lock left


def test_sharded_checkpoint_and_small_shards(tmp_path):
    from moepack.testing.checkpoints import make_random_checkpoint

    src = make_random_checkpoint(tmp_path / "src", hidden=128, intermediate=256, layers=2, experts=4, vocab=300,
                                 shard_size="300KB")
    assert (src / "model.safetensors.index.json").exists() and len(list(src.glob("*.safetensors"))) > 1
    report = compress(str(src), tmp_path / "p.moepack", recipe="q4g64", shard_bytes=200_000)
    with Pack(report.path, verify=True) as pack:
        assert len(pack.manifest.shards) > 1
        assert len(pack.manifest.experts) == 8


def test_unsupported_model_type_lists_supported_ones(baby, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(baby("mixtral"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="mixtral, qwen2_moe, qwen3_moe, olmoe"):
        compress(str(src), tmp_path / "p.moepack")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="neither a folder"):
        compress("not a model", tmp_path / "p.moepack")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        compress(str(tmp_path / "empty"), tmp_path / "p.moepack")


def test_bf16_source_escalates_candidates_to_reach_9x():
    """q2g128 gives only 7.1x from bf16; the extreme 1:4 tier makes the user's `--target-ratio 9` reachable."""
    from moepack.compress import reachable_candidates
    from moepack.profile.profiler import DEFAULT_CANDIDATES, EXTREME_CANDIDATES

    mixtral = (14336, 4096)
    assert reachable_candidates(None, 6, mixtral, 2) == DEFAULT_CANDIDATES
    assert set(EXTREME_CANDIDATES) <= set(reachable_candidates(None, 9, mixtral, 2))
    with pytest.raises(CodecError, match="out of reach"):
        reachable_candidates(None, 20, mixtral, 2)
    from moepack.plan.uniform import uniform_for_ratio

    name, ratio = uniform_for_ratio(9, mixtral, 2)
    assert name.startswith("1:4+") and ratio >= 9
