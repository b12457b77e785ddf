"""Big-little masks and FloE channel selection on hand-made tensors (no pack needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moepack.kernels import Backend
from moepack.runtime.adaptive import (
    big_little_mask,
    little_share,
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


def test_auto_keep_prices_absolute_error():
    """`auto` keeps per expert the k minimising k + (s / mean s) rel(k) / target: two experts with the same
    relative errors but 100x apart in what they add to the hidden state get different keeps (the quiet one
    gives up channels first); without profiled energies the rule is the old relative threshold."""
    from moepack.runtime.adaptive import AdaptiveCalibration

    grid = (0.25, 0.5, 0.75)
    rel = (0.08, 0.02, 0.005)
    cal = AdaptiveCalibration(grid, {(0, 0): rel, (0, 1): rel}, {0: 1.0}, sparse_weight={(0, 0): 2.0, (0, 1): 0.02})
    # mean s = 1.01; loud: price 2/1.01/0.01 = 198 -> costs 1, 16.1, 4.5, 1.74: dense; quiet: price 1.98 ->
    # 1, 0.41, 0.54, 0.76: keep 0.25
    assert cal.keep(0.01) == {(0, 0): 1.0, (0, 1): 0.25}
    assert cal.keep(0.0) == {(0, 0): 1.0, (0, 1): 1.0}
    blind = AdaptiveCalibration(grid, {(0, 0): rel, (0, 1): rel}, {0: 1.0})
    assert blind.keep(0.02) == {(0, 0): 0.5, (0, 1): 0.5}  # smallest keep within the relative target


def test_adaptive_meta_weights_are_checked(tmp_path):
    from moepack.errors import ManifestError
    from moepack.runtime.adaptive import AdaptiveCalibration

    meta = {"keep_grid": [0.5], "sparse_error": [[0, 0, [0.1]], [0, 1, [0.2]]], "drop_error": [[0, 1.0]],
            "sparse_weight": [[0, 0, 1.5], [0, 1, 0.5]]}
    cal = AdaptiveCalibration.from_meta({"adaptive": meta}, tmp_path)
    assert cal.sparse_weight == {(0, 0): 1.5, (0, 1): 0.5}
    for bad in ([[0, 0, 1.5]], [[0, 0, -1.0], [0, 1, 0.5]], [[0, 0, float("nan")], [0, 1, 0.5]], None):
        with pytest.raises(ManifestError, match="sparse_weight|finite|malformed"):
            AdaptiveCalibration.from_meta({"adaptive": dict(meta, sparse_weight=bad)}, tmp_path)
    old = {k: v for k, v in meta.items() if k != "sparse_weight"}  # packs profiled before energies existed
    assert AdaptiveCalibration.from_meta({"adaptive": old}, tmp_path).sparse_weight is None
