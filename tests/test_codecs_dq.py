"""Double-quantised group metadata, `q{b}g{G}d` (codec `gqd`): layout, the exact scale/zero arithmetic,
error against fp16 metadata, and the bits per weight a pack's expert blob really costs."""

from __future__ import annotations

import pytest
import torch

from moepack.codecs import decode, encode, encoded_nbytes, parse_recipe, part_specs, sqnr_db, unpack_bits
from moepack.codecs.quantdq import dq_scale_zero
from moepack.errors import CodecError
from moepack.format import PackWriter

DQ = [f"q{b}g{g}d" for b in (2, 3, 4) for g in (32, 64, 128)]


def _w(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_recipe_grammar():
    r = parse_recipe("2:4+Q4G128D+r8")
    assert r.dq and r.bits == 4 and r.group == 128 and str(r) == "2:4+q4g128d+r8"
    assert r.codec_ids == ("nm", "gqd", "lr")
    assert parse_recipe(str(r)) == r
    with pytest.raises(CodecError):
        parse_recipe("bf16d")
    assert [p.name for p in part_specs("q2g64d", (4, 200))] == ["codes", "gscale", "gzero", "rowq"]
    assert [tuple(p.shape) for p in part_specs("q2g64d", (4, 200))] == [(4, 50), (4, 4), (4, 4), (4, 3)]


@pytest.mark.parametrize("recipe", DQ)
def test_decode_is_the_stated_formula(recipe):
    """s = d_s * gscale, z = z_0 + d_z * gzero (one rounding: the products are exact in float32), then
    w = (q - z) * s per group, the last one ragged."""
    r = parse_recipe(recipe)
    rows, cols = 6, 200
    parts = encode(_w(rows, cols, 1), recipe)
    f = parts["rowq"].double()
    s64 = f[:, 0:1] * parts["gscale"].double()
    z64 = f[:, 1:2] + f[:, 2:3] * parts["gzero"].double()
    s, z = dq_scale_zero(parts)
    assert torch.equal(s.double(), s64)  # exact
    assert torch.equal(z, z64.float())  # rounded once
    gi = torch.arange(cols) // r.group
    q = unpack_bits(parts["codes"], r.bits, cols).float()
    assert torch.equal(decode(parts, recipe, (rows, cols)), (q - z[:, gi]) * s[:, gi])


@pytest.mark.parametrize("cols", [512, 200, 2880])
@pytest.mark.parametrize("base", ["q2g64", "q3g128", "q4g128", "q4g32", "2:4+q4g64"])
def test_as_accurate_as_fp16_metadata_for_fewer_bytes(base, cols):
    w = _w(64, cols, 2)
    imp = torch.rand(cols, generator=torch.Generator().manual_seed(3)) + 0.05
    a = sqnr_db(w, decode(encode(w, base, importance=imp), base, w.shape))
    b = sqnr_db(w, decode(encode(w, base + "d", importance=imp), base + "d", w.shape))
    assert b >= a - 0.1, (a, b)
    assert encoded_nbytes(base + "d", w.shape) < encoded_nbytes(base, w.shape) or cols < 256


@pytest.mark.parametrize("recipe,limit", [("q2g64d", 2.3), ("q4g128d", 4.2)])
@pytest.mark.parametrize("hidden,inter", [(2880, 512), (4096, 384)])
def test_bits_per_weight_of_a_whole_expert_blob(tmp_path, recipe, limit, hidden, inter):
    """Every byte of the expert's blob (three projections, their parts, the 64-byte alignment between
    parts) over its weights: INT2 g64 at most 2.3 bits, INT4 g128 at most 4.2 (fp16 metadata: 2.5, 4.25)."""
    out = tmp_path / "x.moepack"
    shape = (inter, hidden)
    with PackWriter(out, model={}, source={}) as wr:
        projs = {p: (recipe, shape, encode(_w(*shape, k), recipe)) for k, p in enumerate(("up", "gate", "down"))}
        rec = wr.add_expert(0, 0, projs, source_bytes=3 * inter * hidden * 2)
    bpw = 8 * rec.nbytes / (3 * inter * hidden)
    assert bpw <= limit, bpw
    assert rec.nbytes >= sum(p.nbytes for pr in rec.projections.values() for p in pr.parts)


def test_dq_pack_end_to_end(baby, tmp_path):
    """compress --recipe q2g64d on a bf16 baby with hidden 200 (ragged groups too): `inspect` reports the
    blob bits per weight per expert and in total, and the runtime's compiled kernels agree with the torch
    reference."""
    from moepack.cli.inspect_cmd import pack_report
    from moepack.compress import compress
    from moepack.runtime.api import MoePackModel

    src = baby("qwen3_moe", hidden_size=200, dtype="bfloat16")
    pack = compress(str(src), tmp_path / "dq.moepack", recipe="q2g64d").path
    rep = pack_report(pack)
    weights = sum(e["weights"] for e in rep["experts"])
    assert rep["bits_per_weight"] == pytest.approx(8 * rep["pack_bytes"] / weights, abs=1e-4)
    for e in rep["experts"]:
        assert e["bits_per_weight"] == pytest.approx(8 * e["bytes"] / e["weights"], abs=1e-4)
        assert 2.0 < e["bits_per_weight"] < 3.0
    ids = list(range(3, 30))
    ref = MoePackModel.load(pack, device="cpu", backend="torch").logits(ids)
    got = MoePackModel.load(pack, device="cpu").logits(ids)
    assert bool(torch.isfinite(ref).all())
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2


def test_profiled_plan_can_choose_dq_recipes(baby, tmp_path):
    """The profiler measures q{b}g{G}d candidates (with the optimised encoder only: round-to-nearest is a
    plain-metadata baseline) and a --target-ratio plan may pick them."""
    from moepack.compress import compress
    from moepack.profile import profile

    src = str(baby("qwen3_moe"))
    prof = profile(src, candidates=("q4g64", "q2g64d", "q3g64d"), max_tokens=512)
    report = compress(src, tmp_path / "p.moepack", target_ratio=9, profile=prof)
    assert 9 <= report.ratio <= 9 * 1.03
    from moepack.format import Pack

    with Pack(report.path, verify=True) as pack:
        recipes = {pr.recipe for rec in pack.manifest.experts for pr in rec.projections.values()}
    assert recipes & {"q2g64d", "q3g64d"}
