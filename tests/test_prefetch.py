"""Fate prefetch scoring on hand-made cases (no pack needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moepack.runtime.prefetch import FatePrefetcher, PredictionScore


def test_precision_recall_hand_made():
    s = PredictionScore()
    s.add(1, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 4], [2, 3]]))  # token 0: 1 of 2, token 1: 2 of 2
    assert (s.hits, s.predicted, s.actual) == (3, 4, 4)
    assert s.precision == pytest.approx(0.75) and s.recall == pytest.approx(0.75)
    s.add(2, torch.tensor([[5, 6, 7]]), torch.tensor([[7, 0]]))  # wider prediction: precision 1/3, recall 1/2
    assert s.precision == pytest.approx(4 / 7) and s.recall == pytest.approx(4 / 6)
    assert s.layer_recall() == {1: pytest.approx(0.75), 2: pytest.approx(0.5)}
    assert PredictionScore().precision is None


class FakeModel:
    """Two sparse layers; layer 1's router always prefers experts 3 then 1."""

    def __init__(self):
        self.spec = SimpleNamespace(top_k=2, sparse_layer_ids=[0, 1])
        self.route_hooks = []

    def router_logits(self, layer, x):
        assert layer == 1
        return torch.tensor([[0.0, 2.0, 0.5, 3.0]]).expand(x.shape[0], -1)


def test_prefetcher_predicts_next_layer_and_scores_when_it_routes():
    queued = []
    model = FakeModel()
    probs = []

    def queue(keys, p):
        queued.extend(keys)
        probs.extend(p)

    pf = FatePrefetcher(model, SimpleNamespace(queue_prefetch=queue))
    hook = model.route_hooks[0]
    x = torch.zeros(1, 4)
    hook(0, x, None, torch.tensor([[0, 2]]), None)
    assert queued == [(1, 3), (1, 1)]
    assert probs == [pytest.approx(0.5), pytest.approx(0.5)]  # the prior: nothing measured yet
    hook(1, x, None, torch.tensor([[3, 2]]), None)  # routed to 3 and 2: one of two predicted
    assert pf.score.precision == pytest.approx(0.5) and pf.score.recall == pytest.approx(0.5)
    assert len(queued) == 2  # the last layer predicts nothing


def test_rank_calibration_learns_each_ranks_hit_rate():
    """Rank 0 always right, rank 1 always wrong: their probabilities part from the prior of 1/2."""
    from moepack.runtime.prefetch import RankCalibration

    cal = RankCalibration()
    assert cal.prob(1, 0) == pytest.approx(0.5)
    for _ in range(20):
        cal.add(1, torch.tensor([[3, 1], [3, 1]]), torch.tensor([[3, 0], [2, 3]]))
    assert cal.prob(1, 0) == pytest.approx(41 / 42) and cal.prob(1, 1) == pytest.approx(1 / 42)
    assert cal.prob(2, 0) == pytest.approx(0.5)  # another layer: still the prior
