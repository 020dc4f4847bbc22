"""The labeling-effort benchmark's arithmetic, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.bench_labeling_effort import budget_to_reach, reduction, reductions_by_metric

BUDGETS = (25, 50, 100, 200)


def test_budget_to_reach_interpolates_in_log_budget():
    # Target 0.55 lies halfway between 0.6 (at 50) and 0.5 (at 100): sqrt(50 * 100).
    assert budget_to_reach(BUDGETS, [0.7, 0.6, 0.5, 0.45], 0.55) == pytest.approx(
        math.sqrt(50 * 100)
    )
    assert budget_to_reach(BUDGETS, [0.4, 0.3, 0.2, 0.1], 0.5) == 25  # reached at once
    assert budget_to_reach(BUDGETS, [0.9, 0.8, 0.7, 0.6], 0.5) == math.inf  # never


def test_reduction_and_its_interval():
    random = np.array([[0.8, 0.7, 0.6, 0.5]] * 3)
    # Reaches random's 0.5 at 100 labels on every seed: half the labels, no spread.
    better = np.array([[0.7, 0.6, 0.5, 0.4]] * 3)
    got = reduction(BUDGETS, random, better)
    assert (got["reduction"], got["ci_low"], got["ci_high"]) == pytest.approx((0.5, 0.5, 0.5))
    assert got["budget_needed"] == pytest.approx(100)
    assert reduction(BUDGETS, random, random)["reduction"] == pytest.approx(0.0)
    worse = reduction(BUDGETS, random, random + 0.2)
    assert worse["reduction"] == -math.inf and worse["budget_needed"] == math.inf


def test_interval_widens_with_seed_noise():
    random = np.array([[0.8, 0.7, 0.6, 0.5], [0.8, 0.7, 0.6, 0.5], [0.8, 0.7, 0.6, 0.5]])
    noisy = np.array([[0.7, 0.6, 0.5, 0.4], [0.8, 0.7, 0.6, 0.5], [0.6, 0.5, 0.4, 0.3]])
    got = reduction(BUDGETS, random, noisy)
    # The mean curve is `better` above; single seeds range from 0 (second) to 0.75 (third).
    assert got["reduction"] == pytest.approx(0.5)
    assert got["ci_low"] < 0.5 < got["ci_high"]
    assert got["ci_low"] >= 0.0 and got["ci_high"] <= 0.75 + 1e-9


def test_f1_reduction_counts_higher_as_better():
    budgets = (10, 20, 40)
    curves = {
        "random": {"loss": np.array([[0.7, 0.6, 0.5]]), "f1": np.array([[0.30, 0.35, 0.40]])},
        # Reaches random's F1 at 40 (0.40) with 20 labels, but never its loss.
        "margin": {"loss": np.array([[0.8, 0.7, 0.6]]), "f1": np.array([[0.30, 0.40, 0.45]])},
    }
    got = reductions_by_metric(budgets, curves)
    assert got["f1"]["margin"]["reduction"] == pytest.approx(0.5)
    assert got["loss"]["margin"]["reduction"] == -math.inf
    assert got["f1"]["random"]["reduction"] == pytest.approx(0.0)
