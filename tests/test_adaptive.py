"""Big-little masks and FloE channel selection on hand-made tensors (no pack needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moepack.errors import MoepackError
from moepack.kernels import Backend
from moepack.runtime.adaptive import (
    big_little_mask,
    little_share,
    parse_fraction,
    reweight,
    row_runs,
    select_channels,
)
from moepack.runtime.executor import expert_ffn, sparse_ffn


def test_little_share_mask_and_reweight():
    w = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]])
    assert little_share(w).tolist() == pytest.approx([0.8, 0.6])
    little, active = big_little_mask(w, 0.75)
    assert little.tolist() == [True, False]
    assert active.tolist() == [[True, True, False, False], [True, True, True, True]]
    rw = reweight(w, active)
    assert rw[0].tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0]) and torch.equal(rw[1], w[1])
    raw = torch.tensor([[0.3, 0.1]])  # un-normalised top-k keeps its total (0.4)
    assert reweight(raw, big_little_mask(raw, 0.5)[1]).tolist() == [pytest.approx([0.4, 0.0])]


def test_parse_fraction():
    assert parse_fraction("off", "x") is None and parse_fraction(None, "x") is None
    assert parse_fraction("0.25", "x") == 0.25
    for bad in ("1.5", "0", "many"):
        with pytest.raises(MoepackError, match="'off' or a number"):
            parse_fraction(bad, "x")


def test_select_channels_per_token():
    u = torch.tensor([[0.1, -5.0, 0.2, 3.0], [4.0, 0.0, 0.0, -0.1]])
    rows, mask = select_channels(u[:1], 0.5)
    assert rows.tolist() == [1, 3] and mask is None
    rows, mask = select_channels(u, 0.5)
    assert rows.tolist() == [0, 1, 3]  # union of {1, 3} and {0, 3}
    assert mask.tolist() == [[False, True, True], [True, False, True]]
    assert row_runs([0, 1, 3, 4, 5, 9]) == 3


def fp32_projs(inter=16, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {p: torch.randn(inter, hidden, generator=g) for p in ("up", "gate", "down")}
    return w, {p: ({"values": t}, "fp32", (inter, hidden)) for p, t in w.items()}


def test_sparse_ffn_matches_masked_dense_reference():
    w, projs = fp32_projs()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    y, n = sparse_ffn(x, projs, Backend.TORCH, 0.25)
    u = x @ w["up"].T
    keep = torch.zeros_like(u, dtype=torch.bool).scatter_(1, u.abs().topk(4, dim=1).indices, True)
    want = (F.silu(x @ w["gate"].T) * u * keep) @ w["down"]
    assert (y - want).abs().max().item() < 1e-5 and n <= 12
    full, _ = sparse_ffn(x, projs, Backend.TORCH, 1.0)
    assert (full - expert_ffn(x, projs, Backend.TORCH)).abs().max().item() < 1e-5
