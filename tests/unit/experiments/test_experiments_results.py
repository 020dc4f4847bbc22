"""analyze(): corrections, sample size and the plain-words recommendation."""

from __future__ import annotations

import pytest
from statsmodels.stats.multitest import multipletests

from services.experiments import stats
from services.experiments.model import (
    Experiment,
    Goal,
    Metric,
    MetricKind,
    Status,
    Variant,
)
from services.experiments.results import Recommendation, analyze
from services.experiments.settings import ExperimentsSettings

SETTINGS = ExperimentsSettings(_env_file=None)
RATE = stats.Aggregate.rate


def experiment(n_variants: int = 2, guardrails=(), primary=None) -> Experiment:
    w = 1 / n_variants
    return Experiment(
        key="e",
        tenant="t",
        variants=tuple(Variant(f"v{i}", (), w) for i in range(n_variants)),
        status=Status.RUNNING,
        primary_metric=primary or Metric("success"),
        guardrail_metrics=tuple(guardrails),
        minimum_detectable_effect=0.1,
    )


def test_clear_winner_is_shipped_with_its_lift_in_the_reason():
    res = analyze(
        experiment(), [20000, 20000], {"success": [RATE(20000, 2000), RATE(20000, 2500)]}, SETTINGS
    )
    assert res.recommendation == Recommendation.SHIP
    assert "'v1'" in res.reason and "+25.0%" in res.reason
    (c,) = res.metrics[0].comparisons
    assert c.significant and c.bayesian.chance_to_beat_control > 0.999
    assert res.sample_size_reached and not res.srm_detected


def test_sample_ratio_mismatch_stops_whatever_the_metric_says():
    res = analyze(
        experiment(), [20000, 18000], {"success": [RATE(20000, 2000), RATE(18000, 2500)]}, SETTINGS
    )
    assert res.srm_detected and res.srm_p_value < 0.001
    assert res.recommendation == Recommendation.STOP
    assert "sample ratio mismatch" in res.reason


def test_guardrail_harm_stops():
    latency = Metric("latency_ms", MetricKind.MEAN, Goal.DECREASE)
    exp = experiment(guardrails=[latency])
    slow = stats.Aggregate(5000, 5000 * 300.0, 5000 * (300.0**2 + 50.0**2))
    fast = stats.Aggregate(5000, 5000 * 200.0, 5000 * (200.0**2 + 50.0**2))
    res = analyze(
        exp,
        [5000, 5000],
        {"success": [RATE(5000, 500), RATE(5000, 600)], "latency_ms": [fast, slow]},
        SETTINGS,
    )
    assert res.recommendation == Recommendation.STOP
    assert "latency_ms" in res.reason and "harms" in res.reason
    (lat,) = res.metrics[1].comparisons
    assert lat.comparison.relative_lift == pytest.approx(-0.5)  # 50% worse, sign = goodness


def test_early_and_undecided_keeps_running():
    res = analyze(experiment(), [150, 150], {"success": [RATE(150, 15), RATE(150, 17)]}, SETTINGS)
    assert res.recommendation == Recommendation.KEEP_RUNNING
    assert not res.sample_size_reached
    assert res.required_units_per_variant == stats.required_sample_size(0.1, 0.1, 0.05, 0.8)
    assert f"of {res.required_units_per_variant} units" in res.reason


def test_no_difference_at_the_planned_size_stops_and_keeps_control():
    res = analyze(
        experiment(), [40000, 40000], {"success": [RATE(40000, 4000), RATE(40000, 4010)]}, SETTINGS
    )
    assert res.sample_size_reached
    assert res.recommendation == Recommendation.STOP and "keep control" in res.reason


def test_no_data_keeps_running():
    res = analyze(experiment(), [0, 0], {}, SETTINGS)
    assert res.recommendation == Recommendation.KEEP_RUNNING
    assert res.srm_p_value == 1.0


def test_holm_is_applied_across_variants_and_metrics():
    rating = Metric("rating", MetricKind.MEAN)
    exp = experiment(3, guardrails=[rating])
    ratings = [stats.Aggregate.of([3, 4, 5, 4] * 50), stats.Aggregate.of([3, 4, 5, 5] * 50)]
    ratings.append(stats.Aggregate.of([2, 4, 5, 4] * 50))
    res = analyze(
        exp,
        [3000, 3000, 3000],
        {"success": [RATE(3000, 300), RATE(3000, 345), RATE(3000, 310)], "rating": ratings},
        SETTINGS,
    )
    comps = [c for m in res.metrics for c in m.comparisons]
    assert len(comps) == 4
    want = multipletests([c.comparison.p_value for c in comps], method="holm")[1]
    assert [c.adjusted_p_value for c in comps] == pytest.approx(want.tolist())
