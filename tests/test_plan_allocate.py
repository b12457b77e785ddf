"""The knapsack planner: hits the target ratio, respects the byte budget, spends bytes where they matter."""

from __future__ import annotations

import itertools
import random

import pytest

from moepack.errors import CodecError
from moepack.plan.allocate import allocate, check_reachable, expert_weights, projection_nbytes

SHAPE = (256, 512)  # [I, H]
RECIPES = ("fp16", "q4g64", "q4g128", "q3g64", "q3g128", "q2g32", "q2g64", "q2g128", "q2g64+r16")
# rough relative squared output errors of each recipe (smaller is better), per projection kind
BASE_ERR = {"fp16": 1e-7, "q4g64": 0.006, "q4g128": 0.008, "q3g64": 0.027, "q3g128": 0.034, "q2g32": 0.09,
            "q2g64": 0.11, "q2g128": 0.12, "q2g64+r16": 0.07}
PROJ_SCALE = {"up": 0.6, "gate": 1.0, "down": 1.3}  # FloE: up tolerates low bits best


def synthetic(layers=4, experts=16, seed=0):
    rng = random.Random(seed)
    errors, freqs = {}, {}
    for layer in range(layers):
        raw = [rng.paretovariate(1.5) for _ in range(experts)]
        for e in range(experts):
            freqs[(layer, e)] = raw[e] / sum(raw)
            for proj, scale in PROJ_SCALE.items():
                jitter = rng.uniform(0.7, 1.4)
                errors[(layer, e, proj)] = {r: v * scale * jitter for r, v in BASE_ERR.items()}
    size = {r: projection_nbytes(r, SHAPE) for r in RECIPES}
    nbytes = {item: size for item in errors}
    w = expert_weights(freqs)
    weights = {item: w[item[:2]] for item in errors}
    source = len(freqs) * 3 * SHAPE[0] * SHAPE[1] * 4  # fp32 source
    return errors, nbytes, weights, freqs, source


def objective(plan, errors, weights):
    return sum(weights[i] * errors[i][r] for i, r in plan.items())


@pytest.mark.parametrize("target", [2.5, 4, 6, 7.3, 9, 13])
def test_hits_the_target_within_3_percent_and_respects_the_budget(target):
    errors, nbytes, weights, _, source = synthetic()
    alloc = allocate(errors, nbytes, weights, source_bytes=source, target_ratio=target)
    spent = sum(nbytes[i][r] for i, r in alloc.plan.items())
    assert spent == alloc.planned_bytes <= alloc.budget_bytes == int(source // target)
    assert target <= alloc.ratio <= target * 1.03, alloc.ratio
    assert alloc.expected_error == pytest.approx(objective(alloc.plan, errors, weights) / 4)


def test_more_bytes_never_give_a_worse_plan():
    errors, nbytes, weights, _, source = synthetic(seed=3)
    errs = [allocate(errors, nbytes, weights, source_bytes=source, target_ratio=t).expected_error
            for t in (12, 9, 7, 5, 4, 3)]
    assert errs == sorted(errs, reverse=True)


def test_rarely_used_experts_get_cheaper_recipes():
    # two layers' worth of identical experts; only their routing frequency differs
    freqs = {(0, e): f for e, f in enumerate((0.40, 0.30, 0.20, 0.07, 0.02, 0.01, 0.0, 0.0))}
    errors = {(0, e, p): {r: v * PROJ_SCALE[p] for r, v in BASE_ERR.items()} for e in range(8) for p in PROJ_SCALE}
    size = {r: projection_nbytes(r, SHAPE) for r in RECIPES}
    nbytes = {i: size for i in errors}
    w = expert_weights(freqs)
    weights = {i: w[i[:2]] for i in errors}
    source = 8 * 3 * SHAPE[0] * SHAPE[1] * 4
    alloc = allocate(errors, nbytes, weights, source_bytes=source, target_ratio=9)
    per_expert = [sum(size[alloc.plan[(0, e, p)]] for p in PROJ_SCALE) for e in range(8)]
    assert per_expert == sorted(per_expert, reverse=True), per_expert  # bytes follow frequency
    assert per_expert[0] > per_expert[-1]
    # within an expert, the projection that tolerates error best (up) never gets more bytes than down
    for e in range(8):
        assert size[alloc.plan[(0, e, "up")]] <= size[alloc.plan[(0, e, "down")]]


def test_close_to_the_exhaustive_optimum_on_a_small_instance():
    errors, nbytes, weights, _, source = synthetic(layers=1, experts=2, seed=5)
    few = ("fp16", "q4g64", "q3g128", "q2g64", "q2g128")
    errors = {i: {r: errs[r] for r in few} for i, errs in errors.items()}
    items = sorted(errors)
    for target in (3, 5, 8, 11):
        budget = source // target
        best = min((objective(dict(zip(items, combo, strict=True)), errors, weights)
                    for combo in itertools.product(few, repeat=len(items))
                    if sum(nbytes[i][r] for i, r in zip(items, combo, strict=True)) <= budget), default=None)
        alloc = allocate(errors, nbytes, weights, source_bytes=source, target_ratio=target)
        assert objective(alloc.plan, errors, weights) <= best * 1.25 + 1e-12, target


def test_unused_experts_and_unmeasurable_recipes():
    errors = {(0, 0, "up"): {"q4g64": 0.01, "q2g64": 0.1, "fp16": float("inf")},
              (0, 1, "up"): {"q4g64": 0.01, "q2g64": 0.1, "fp16": 0.0}}
    size = {r: projection_nbytes(r, SHAPE) for r in ("q4g64", "q2g64", "fp16")}
    nbytes = {i: size for i in errors}
    src = 2 * SHAPE[0] * SHAPE[1] * 2
    alloc = allocate(errors, nbytes, {(0, 0, "up"): 1.0, (0, 1, "up"): 0.0}, source_bytes=src, target_ratio=1.0)
    assert alloc.plan == {(0, 0, "up"): "q4g64", (0, 1, "up"): "q2g64"}  # inf never chosen; weight 0 -> cheapest


def test_an_unreachable_ratio_is_a_clear_error():
    errors, nbytes, weights, _, source = synthetic(layers=1, experts=2)
    with pytest.raises(CodecError, match="out of reach"):
        allocate(errors, nbytes, weights, source_bytes=source, target_ratio=20)
    with pytest.raises(CodecError, match=r"cheapest candidate recipe \(q2g128\)"):
        check_reachable(9, RECIPES, SHAPE, 2)  # bf16 source: 2.25 bits per weight at best is 7.1x
    check_reachable(9, RECIPES, SHAPE, 4)


def test_expert_weights_sum_to_one_per_layer_and_keep_a_floor():
    w = expert_weights({(0, 0): 1.0, (0, 1): 0.0, (1, 0): 0.5, (1, 1): 0.5}, floor=0.1)
    assert w[(0, 0)] + w[(0, 1)] == pytest.approx(1.0)
    assert w[(0, 1)] == pytest.approx(0.05)
    assert w[(1, 0)] == pytest.approx(0.5)
