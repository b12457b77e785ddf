"""Any row length (format version 2): a ragged last quantisation group and a short last N:M block.

Widths 100, 160, 200 and 2880 (GPT-OSS's hidden size: 22.5 groups of 128) for every recipe family:
the layout follows from (recipe, shape), nothing padded is stored, round trips are exact where the
arithmetic is, and a ragged encoding is exactly the encoding of its whole groups followed by that of
its last group alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from moepack.codecs import decode, encode, encoded_nbytes, parse_recipe, part_specs, unpack_bits
from moepack.codecs.sparse import kept_count, nm_encode_index, nm_positions, nm_select
from moepack.errors import CodecError

WIDTHS = (100, 160, 200, 2880)
ROWS = 12
QUANT = [f"q{b}g{g}" for b in (2, 3, 4) for g in (32, 64, 128)]
OTHER = ["fp32", "bf16", "fp16", "2:4+q4g64", "1:4+q2g128", "4:8+q3g32", "2:4+fp16", "3:8+bf16", "1:4+q4g128",
         "q2g64+r8", "q4g128+r4", "2:4+q2g128+r4"]


def _w(cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, cols, generator=torch.Generator().manual_seed(seed + cols))


@pytest.mark.parametrize("cols", WIDTHS)
@pytest.mark.parametrize("recipe", QUANT + OTHER)
def test_every_recipe_encodes_any_width(recipe, cols):
    r = parse_recipe(recipe)
    w = _w(cols)
    imp = torch.rand(cols, generator=torch.Generator().manual_seed(1)) + 0.1
    parts = encode(w, recipe, importance=imp)
    specs = part_specs(recipe, (ROWS, cols))
    assert [(n, t.dtype, tuple(t.shape)) for n, t in parts.items()] == [(p.name, p.dtype, p.shape) for p in specs]
    assert sum(t.numel() * t.element_size() for t in parts.values()) == encoded_nbytes(recipe, (ROWS, cols))
    if r.quantized:  # nothing padded: ceil(cols/G) groups, ceil(stored*b/8) bytes per row
        stored = r.stored_cols(cols)
        assert parts["scale"].shape[1] == math.ceil(stored / r.group)
        assert parts["codes"].shape[1] == math.ceil(stored * r.bits / 8)
    out = decode(parts, recipe, (ROWS, cols))
    assert out.shape == (ROWS, cols) and bool(torch.isfinite(out).all())
    assert float((out - w).norm() / w.norm()) < 0.95  # a real approximation, not noise


@pytest.mark.parametrize(("recipe", "cols"), [
    (recipe, cols) for recipe in QUANT for cols in WIDTHS
    if 0 < cols // parse_recipe(recipe).group * parse_recipe(recipe).group < cols])  # a ragged last group
def test_ragged_encoding_is_whole_groups_then_the_last_group(recipe, cols):
    """Each group is fitted alone, so the ragged last group's parts equal those of encoding its columns
    by themselves, and the whole groups' parts those of encoding the rest; codes concatenate bytewise
    (whole groups hold a multiple of 32 codes)."""
    r = parse_recipe(recipe)
    w = _w(cols, seed=7)
    full = cols // r.group * r.group
    whole, last, both = encode(w[:, :full], recipe), encode(w[:, full:], recipe), encode(w, recipe)
    for k in ("scale", "zero", "codes"):
        assert torch.equal(both[k], torch.cat([whole[k], last[k]], dim=1)), k
    # and the decode is the two decodes side by side, bit for bit
    ref = torch.cat([decode(whole, recipe, (ROWS, full)), decode(last, recipe, (ROWS, cols - full))], dim=1)
    assert torch.equal(decode(both, recipe, (ROWS, cols)), ref)


@pytest.mark.parametrize("cols", [100, 200, 2880, 37])
@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 128), (4, 32)])
def test_ragged_decode_follows_the_formula(bits, group, cols):
    """Random parts (every code value): w[r, c] = (q[r, c] - zero[r, c // G]) * scale[r, c // G], in fp32."""
    g = torch.Generator().manual_seed(cols * bits + group)
    ng, nbytes = -(-cols // group), -(-cols * bits // 8)
    codes = torch.randint(0, 256, (ROWS, nbytes), generator=g, dtype=torch.uint8)
    codes[:, -1] &= (1 << ((cols * bits - 1) % 8 + 1)) - 1  # the row's pad bits are zero
    parts = {"codes": codes, "scale": (torch.rand(ROWS, ng, generator=g) + 0.01).half(),
             "zero": (torch.rand(ROWS, ng, generator=g) * 2**bits).half()}
    recipe = f"q{bits}g{group}"
    q = unpack_bits(codes, bits, cols).float()
    gi = torch.arange(cols) // group
    want = (q - parts["zero"].float()[:, gi]) * parts["scale"].float()[:, gi]
    assert torch.equal(decode(parts, recipe, (ROWS, cols)), want)


@pytest.mark.parametrize("cols", WIDTHS + (37,))
@pytest.mark.parametrize("recipe", QUANT)
def test_weights_on_a_grid_round_trip_exactly(recipe, cols):
    """Weights that are exactly (q - z) * s with fp16 s, integer z, and codes 0 and 2^b - 1 in every
    group (the ragged one included) decode back bit for bit: the min/max fit recovers (s, z) exactly."""
    r = parse_recipe(recipe)
    qm = (1 << r.bits) - 1
    g = torch.Generator().manual_seed(cols + qm)
    gi = torch.arange(cols) // r.group
    ng = int(gi[-1]) + 1
    q = torch.randint(0, qm + 1, (ROWS, cols), generator=g).float()
    starts = torch.arange(ng) * r.group
    q[:, starts], q[:, starts + 1] = 0.0, float(qm)  # every group spans the whole grid
    s = (torch.rand(ROWS, ng, generator=g) + 0.05).half().float()
    z = torch.randint(0, qm + 1, (ROWS, ng), generator=g).float()
    w = (q - z[:, gi]) * s[:, gi]
    assert torch.equal(decode(encode(w, recipe), recipe, (ROWS, cols)), w)


@pytest.mark.parametrize("cols", WIDTHS)
@pytest.mark.parametrize("dtype,name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_passthrough_and_sparse_passthrough_are_exact(dtype, name, cols):
    w = _w(cols, seed=3).to(dtype)
    assert torch.equal(decode(encode(w, name), name, (ROWS, cols), dtype=dtype), w)
    for nm in ("2:4", "3:8", "1:4"):
        n, m = map(int, nm.split(":"))
        recipe = f"{nm}+{name}"
        out = decode(encode(w, recipe), recipe, (ROWS, cols), dtype=dtype)
        kept = out != 0
        assert torch.equal(out[kept], w[kept])  # kept values exactly, zeros elsewhere
        nb, tail = cols // m, cols % m
        per_block = kept[:, : nb * m].reshape(ROWS, nb, m).sum(-1)
        assert bool((per_block == n).all())
        if tail:  # the short last block keeps ceil(N*L/M), its largest magnitudes
            k = -(-n * tail // m)
            assert bool((kept[:, nb * m :].sum(-1) == k).all())
            top = w[:, nb * m :].float().abs().sort(-1, descending=True).values[:, k - 1 : k]
            assert bool((w[:, nb * m :].float().abs()[kept[:, nb * m :]].view(ROWS, k) >= top).all())


@pytest.mark.parametrize("n,m,cols", [(2, 4, 102), (1, 4, 7), (3, 8, 13), (4, 8, 2885), (2, 4, 1), (1, 16, 17)])
def test_nm_short_block_index_round_trip(n, m, cols):
    w = torch.randn(5, cols, generator=torch.Generator().manual_seed(cols))
    pos = nm_select(w, n, m)
    assert pos.shape == (5, kept_count(n, m, cols))
    assert bool((pos[:, 1:] > pos[:, :-1]).all()) and bool((pos < cols).all())
    assert torch.equal(nm_positions(nm_encode_index(pos, m), n, m, cols), pos)


def test_nm_index_past_the_short_block_is_refused():
    """A short last block of 2 columns under 2:4 keeps one value; an index pointing at its 3rd or 4th
    (missing) column is corrupt."""
    n, m, cols = 2, 4, 6
    pos = torch.tensor([[0, 2, 4]])
    idx = nm_encode_index(pos, m)
    assert torch.equal(nm_positions(idx, n, m, cols), pos)
    bad = nm_encode_index(torch.tensor([[0, 2, 7]]), m)  # offset 3 in the last block = column 7 of 6
    with pytest.raises(CodecError, match="outside its block"):
        nm_positions(bad, n, m, cols)


def test_bits_per_weight_counts_the_ragged_group():
    """2880 = 22.5 groups of 128: 23 groups of fp16 scale and zero per row, nothing else."""
    r = parse_recipe("q4g128")
    assert r.bits_per_weight((4, 2880)) == pytest.approx(4 + 23 * 32 / 2880)
    assert parse_recipe("q2g64").bits_per_weight((4, 160)) == pytest.approx(2 + 3 * 32 / 160)
    assert parse_recipe("1:4+q2g128").stored_cols(160) == 40
    assert parse_recipe("2:4+q4g64").stored_cols(102) == 51  # 25 blocks of 2 and ceil(2*2/4) = 1
    assert not parse_recipe("q4g128").divides(160) and parse_recipe("q4g32").divides(160)
