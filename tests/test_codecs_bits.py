"""Bit packing: exact round trips (hypothesis), golden bytes for the contract's bit order, N:M indices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepack.codecs import pack_bits, packed_nbytes, unpack_bits
from moepack.codecs.sparse import nm_compact, nm_encode_index, nm_positions, nm_scatter, nm_select
from moepack.errors import CodecError


@st.composite
def code_rows(draw, bits: int):
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    flat = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=rows * n, max_size=rows * n))
    return torch.tensor(flat, dtype=torch.uint8).reshape(rows, n)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pack_unpack_round_trip_is_exact(bits, data):
    codes = data.draw(code_rows(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_nbytes(codes.shape[1], bits))
    assert torch.equal(unpack_bits(packed, bits, codes.shape[1]), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_pack_matches_a_bit_by_bit_reference(bits, data):
    codes = data.draw(code_rows(bits))
    for row, packed in zip(codes.tolist(), pack_bits(codes, bits).tolist(), strict=True):
        stream = [(c >> i) & 1 for c in row for i in range(bits)]  # code c at bits [c*b, (c+1)*b)
        stream += [0] * (-len(stream) % 8)
        ref = [sum(stream[k + i] << i for i in range(8)) for k in range(0, len(stream), 8)]
        assert packed == ref


def test_golden_bytes():
    assert pack_bits(torch.tensor([[0x1, 0x2, 0xF, 0x0]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]
    assert pack_bits(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    # 3-bit: 8 codes in 3 bytes; 0..7 -> stream 000 100 010 110 001 101 011 111 (LSB first)
    assert pack_bits(torch.arange(8, dtype=torch.uint8)[None], 3).tolist() == [[0x88, 0xC6, 0xFA]]
    assert packed_nbytes(9, 3) == 4 and packed_nbytes(64, 4) == 32


def test_unpack_rejects_wrong_width_and_bits():
    with pytest.raises(CodecError):
        unpack_bits(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)
    with pytest.raises(CodecError):
        pack_bits(torch.zeros(1, 8, dtype=torch.uint8), 9)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), blocks=st.integers(1, 9))
def test_nm_index_round_trip(n, m, seed, rows, blocks):
    g = torch.Generator().manual_seed(seed)
    cols = blocks * m
    w = torch.randn(rows, cols, generator=g)
    pos = nm_select(w, n, m)  # [rows, K] column indices
    assert bool((pos[:, 1:] > pos[:, :-1]).all()), "positions must be ascending"
    assert bool((pos // m == torch.arange(blocks).repeat_interleave(n)).all()), "N per block"
    back = nm_positions(nm_encode_index(pos, m), n, m, cols)
    assert torch.equal(back, pos)
    kept = nm_compact(w, pos)
    dense = nm_scatter(kept, pos, cols)
    nz = (dense != 0).reshape(rows, blocks, m).sum(-1)
    assert bool((nz <= n).all())
    # the kept values are the N largest magnitudes of each block
    thresh = w.abs().reshape(rows, blocks, m).sort(-1, descending=True).values[..., n - 1]
    assert bool((kept.abs().reshape(rows, blocks, n) >= thresh[..., None]).all())
