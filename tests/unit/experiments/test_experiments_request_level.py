"""Request-level metrics (from the analytics service): converting its answers to aggregates,
the design-effect correction for users with several requests, the running minimum."""

from __future__ import annotations

import numpy as np
import pytest

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from services.experiments import stats
from services.experiments.analytics_source import SOURCES, aggregate, source_of
from services.experiments.core import VariantCounts
from services.experiments.model import Experiment, Metric, MetricKind, Status, Variant
from services.experiments.reporting import design_effects
from services.experiments.results import MetricData, analyze
from services.experiments.settings import ExperimentsSettings


def test_mean_and_stddev_give_back_the_sums_numpy_computes():
    rng = np.random.default_rng(1)
    latency = rng.gamma(3.0, 0.1, size=777)
    m = apb.AdapterMetrics(
        requests=777,
        successes=700,
        latency_mean_seconds=latency.mean(),
        latency_stddev_seconds=latency.std(ddof=1),
    )
    ms = aggregate(SOURCES["latency_ms"], m)
    assert ms.n == 777
    assert ms.sum == pytest.approx((latency * 1000).sum(), rel=1e-12)
    assert ms.sum_squares == pytest.approx(((latency * 1000) ** 2).sum(), rel=1e-12)
    assert ms.variance == pytest.approx((latency * 1000).var(ddof=1), rel=1e-9)
    rate = aggregate(SOURCES["success"], m)
    assert (rate.n, rate.sum) == (777, 700)
    # a name analytics knows, declared with another kind, is not taken from analytics
    assert source_of(Metric("success", MetricKind.MEAN)) is None
    assert source_of(Metric("completion_tokens", MetricKind.MEAN)) is None


def test_design_effect_is_sum_of_squares_over_sum_of_requests_per_user():
    # control: users with 1, 2 and 3 requests; treatment: two users with 4 each
    counts = VariantCounts([3, 2], [1 + 2 + 3, 4 + 4], [1 + 4 + 9, 16 + 16])
    assert design_effects(counts) == [pytest.approx(14 / 6), pytest.approx(4.0)]
    assert design_effects(VariantCounts([0, 0], [0, 0], [0, 0])) is None


def _simulate(rng, users: int, sims: int):
    """Per simulated A/A arm: requests, successes, sum over users of m and of m^2, where
    user u sends m_u ~ 1 + Poisson(6) requests that succeed with its own p_u ~ Beta(2, 3)."""
    m = 1 + rng.poisson(6.0, size=(sims, users))
    p = rng.beta(2, 3, size=(sims, users))
    successes = rng.binomial(m, p)
    return m.sum(1), successes.sum(1), (m * m).sum(1)


def test_design_effect_keeps_the_false_positive_rate_of_clustered_requests_at_alpha():
    """A/A: users differ, so their requests are correlated. Treating requests as independent
    rejects far more often than alpha; the design-effect bound brings it to at most alpha."""
    rng = np.random.default_rng(2024)
    sims, users, alpha = 2000, 150, 0.05
    a = _simulate(rng, users, sims)
    b = _simulate(rng, users, sims)
    naive = corrected = 0
    for i in range(sims):
        aggs = [stats.Aggregate.rate(int(x[0][i]), float(x[1][i])) for x in (a, b)]
        effects = [float(x[2][i] / x[0][i]) for x in (a, b)]
        naive += stats.two_proportion_ztest(*aggs).p_value < alpha
        eff = MetricData(aggs, "analytics", "request", effects).effective()
        corrected += stats.two_proportion_ztest(*eff).p_value < alpha
    naive_rate, corrected_rate = naive / sims, corrected / sims
    # measured with this seed: naive 0.1745, corrected 0.0 (the bound assumes a user's
    # requests are perfectly correlated; here they are far less, so it is conservative)
    assert naive_rate > 0.15
    assert corrected_rate <= alpha


def _exp() -> Experiment:
    return Experiment(
        "k",
        "t",
        (Variant("control", (), 0.5), Variant("treat", (), 0.5)),
        status=Status.RUNNING,
        primary_metric=Metric("success"),
    )


def test_reported_sequential_p_value_never_exceeds_an_earlier_one():
    exp = _exp()
    aggs = {"success": [stats.Aggregate.rate(1000, 200), stats.Aggregate.rate(1000, 205)]}
    settings = ExperimentsSettings()
    fresh = analyze(exp, [1000, 1000], aggs, settings)
    current = fresh.sequential["outcomes|success|treat"]
    assert current == fresh.metrics[0].comparisons[0].sequential.p_value
    floor = current / 10
    again = analyze(exp, [1000, 1000], aggs, settings, {"outcomes|success|treat": floor})
    assert again.metrics[0].comparisons[0].sequential.p_value == floor
    assert again.sequential["outcomes|success|treat"] == floor
    # a floor above the current value changes nothing
    higher = analyze(exp, [1000, 1000], aggs, settings, {"outcomes|success|treat": 1.0})
    assert higher.sequential["outcomes|success|treat"] == current
    # a floor under alpha / m makes the comparison significant, as a p-value that low did
    low = analyze(exp, [1000, 1000], aggs, settings, {"outcomes|success|treat": 1e-4})
    assert low.metrics[0].comparisons[0].significant
