"""Recipe parsing: canonical round trip, validation errors, sizes, registry ids."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepack.codecs import CODECS, Recipe, encoded_nbytes, get_codec, parse_recipe, part_specs
from moepack.errors import CodecError

recipes = st.builds(
    lambda nm, base, rank: "+".join(x for x in (nm, base, rank) if x),
    st.sampled_from(["", "2:4", "4:8", "1:4", "3:8"]),
    st.sampled_from(["bf16", "fp16", "fp32"] + [f"q{b}g{g}" for b in (2, 3, 4) for g in (32, 64, 128)]),
    st.sampled_from(["", "r1", "r8", "r16", "r64"]),
)


@given(recipes)
def test_parse_str_round_trip(s):
    r = parse_recipe(s)
    assert str(r) == s
    assert parse_recipe(str(r)) == r
    assert hash(parse_recipe(s)) == hash(r)


def test_parse_fields_and_canonical_form():
    r = parse_recipe(" 2:4 + Q4G64 + R16 ")
    assert (r.n, r.m, r.bits, r.group, r.dtype, r.rank) == (2, 4, 4, 64, None, 16)
    assert str(r) == "2:4+q4g64+r16"
    assert r.codec_ids == ("nm", "gq", "lr")
    assert parse_recipe("bf16").codec_ids == ("raw",)
    assert parse_recipe("2:4+fp16").codec_ids == ("nm", "raw")
    assert parse_recipe(r) is r
    with pytest.raises(AttributeError):
        r.bits = 2  # frozen


@pytest.mark.parametrize(
    "bad",
    ["", "q5g128", "q1g64", "q4g100", "q4g0", "q4", "g128", "int8", "fp8", "2:2+q4g64", "0:4+fp16", "4:2+fp16",
     "2:32+fp16", "2:4", "q4g64+r0", "r16+q4g64", "q4g64+2:4", "q4g64+r16+r8", "2:4+4:8+fp16", "q4g64+fp16",
     "q4g64+", "+q4g64", "q4g64+rx"],
)
def test_bad_recipes_raise_codec_error(bad):
    with pytest.raises(CodecError):
        parse_recipe(bad)


def test_non_string_recipe_raises():
    with pytest.raises(CodecError):
        parse_recipe(4)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        Recipe(bits=4)


@pytest.mark.parametrize(
    "recipe,shape,needle",
    [
        ("q4g32+r16", (8, 64), "rank 16 exceeds"),
        ("bf16", (8,), "2-D shape"),
        ("bf16", (0, 8), "2-D shape"),
    ],
)
def test_shape_constraints_raise_with_clear_message(recipe, shape, needle):
    with pytest.raises(CodecError, match=needle):
        part_specs(recipe, shape)
    with pytest.raises(CodecError):
        parse_recipe(recipe).bits_per_weight(shape)


def test_sizes_and_bits_per_weight():
    shape = (64, 256)
    assert encoded_nbytes("bf16", shape) == 64 * 256 * 2
    # codes 4 bits + fp16 scale and zero per 128 weights = 4 + 32/128
    assert parse_recipe("q4g128").bits_per_weight(shape) == pytest.approx(4.25)
    assert parse_recipe("q3g64").bits_per_weight(shape) == pytest.approx(3.5)
    assert parse_recipe("q2g32").bits_per_weight(shape) == pytest.approx(3.0)
    # 2:4: half the values at 4.5 bpw + 2-bit index per kept value
    assert parse_recipe("2:4+q4g64").bits_per_weight(shape) == pytest.approx(0.5 * 4.5 + 0.5 * 2)
    assert parse_recipe("4:8+fp16").bits_per_weight(shape) == pytest.approx(0.5 * 16 + 0.5 * 3)
    lr = 16 * (64 + 256) * 16 / (64 * 256)
    assert parse_recipe("q2g64+r16").bits_per_weight(shape) == pytest.approx(2.5 + lr)


def test_part_specs_layout_matches_contract():
    specs = part_specs("2:4+q3g32+r4", (16, 256))
    got = [(p.name, p.dtype, p.shape) for p in specs]
    assert got == [
        ("nm_index", torch.uint8, (16, 256 // 4 * 2 * 2 // 8)),
        ("codes", torch.uint8, (16, 128 * 3 // 8)),
        ("scale", torch.float16, (16, 128 // 32)),
        ("zero", torch.float16, (16, 128 // 32)),
        ("lr_u", torch.float16, (16, 4)),
        ("lr_v", torch.float16, (4, 256)),
    ]
    assert [(p.name, p.shape) for p in part_specs("4:8+bf16", (2, 16))] == [("nm_index", (2, 3)), ("values", (2, 8))]


def test_registry_has_stable_ids():
    assert set(CODECS) >= {"raw", "gq", "nm", "lr"}
    assert get_codec("gq").kind == "base" and get_codec("lr").kind == "residual"
    with pytest.raises(CodecError, match="unknown codec id"):
        get_codec("zstd")
