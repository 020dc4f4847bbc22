"""The statistics agree with scipy / statsmodels reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportions_ztest

from services.experiments import stats

RATES = [(1000, 100, 1000, 120), (5000, 250, 5200, 300), (300, 150, 310, 140), (80, 3, 90, 9)]


@pytest.mark.parametrize(("nc", "xc", "nt", "xt"), RATES)
def test_two_proportion_ztest_matches_statsmodels(nc, xc, nt, xt):
    got = stats.two_proportion_ztest(stats.Aggregate.rate(nc, xc), stats.Aggregate.rate(nt, xt))
    z, p = proportions_ztest([xt, xc], [nt, nc])
    assert got.statistic == pytest.approx(z, rel=1e-9)
    assert got.p_value == pytest.approx(p, rel=1e-9)
    assert got.relative_lift == pytest.approx((xt / nt) / (xc / nc) - 1)


def test_relative_lift_ci_covers_the_truth_at_its_nominal_rate():
    """Delta-method CI coverage by simulation (rates and means)."""
    rng = np.random.default_rng(1)
    hits_rate = hits_mean = 0
    trials = 2000
    for _ in range(trials):
        xc, xt = rng.binomial(4000, 0.10), rng.binomial(4000, 0.11)
        low, high = stats.two_proportion_ztest(
            stats.Aggregate.rate(4000, xc), stats.Aggregate.rate(4000, xt)
        ).relative_ci
        hits_rate += low <= 0.1 <= high
        c, t = rng.exponential(2.0, 400), rng.exponential(2.2, 400)
        low, high = stats.welch_ttest(stats.Aggregate.of(c), stats.Aggregate.of(t)).relative_ci
        hits_mean += low <= 0.1 <= high
    assert 0.93 <= hits_rate / trials <= 0.97
    assert 0.93 <= hits_mean / trials <= 0.97


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_ttest_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    c = rng.normal(10, 3, 200 + 50 * seed)
    t = rng.normal(10.5, 5, 150)
    got = stats.welch_ttest(stats.Aggregate.of(c), stats.Aggregate.of(t))
    ref = st.ttest_ind(t, c, equal_var=False)
    assert got.statistic == pytest.approx(ref.statistic, rel=1e-7)
    assert got.p_value == pytest.approx(ref.pvalue, rel=1e-6)
    assert got.control_mean == pytest.approx(c.mean())
    # CI from the delta method against a direct computation
    vc, vt = c.var(ddof=1) / len(c), t.var(ddof=1) / len(t)
    mc, mt = c.mean(), t.mean()
    se = math.sqrt(vt / mc**2 + mt**2 * vc / mc**4)
    df = (vc + vt) ** 2 / (vc**2 / (len(c) - 1) + vt**2 / (len(t) - 1))
    crit = st.t.ppf(0.975, df)
    assert got.relative_ci == pytest.approx((mt / mc - 1 - crit * se, mt / mc - 1 + crit * se))


@pytest.mark.parametrize(("nc", "xc", "nt", "xt"), RATES)
def test_bayes_rates_matches_monte_carlo(nc, xc, nt, xt):
    got = stats.bayes_rates(stats.Aggregate.rate(nc, xc), stats.Aggregate.rate(nt, xt))
    rng = np.random.default_rng(0)
    c = rng.beta(1 + xc, 1 + nc - xc, 1_000_000)
    t = rng.beta(1 + xt, 1 + nt - xt, 1_000_000)
    assert got.chance_to_beat_control == pytest.approx((t > c).mean(), abs=0.003)
    assert got.expected_loss == pytest.approx(np.maximum(c - t, 0).mean(), rel=0.02, abs=1e-5)


def test_bayes_rates_matches_exact_closed_form():
    """Evan Miller's exact P(p_T > p_C) for Beta posteriors."""
    from scipy.special import betaln

    nc, xc, nt, xt = 60, 12, 55, 18
    a_c, b_c, a_t, b_t = 1 + xc, 1 + nc - xc, 1 + xt, 1 + nt - xt
    exact = sum(
        math.exp(
            betaln(a_c + i, b_c + b_t) - math.log(b_t + i) - betaln(1 + i, b_t) - betaln(a_c, b_c)
        )
        for i in range(a_t)
    )
    got = stats.bayes_rates(stats.Aggregate.rate(nc, xc), stats.Aggregate.rate(nt, xt))
    assert got.chance_to_beat_control == pytest.approx(exact, abs=1e-4)


def test_bayes_rates_lower_is_better_mirrors():
    c, t = stats.Aggregate.rate(1000, 100), stats.Aggregate.rate(1000, 130)
    up = stats.bayes_rates(c, t, higher_is_better=True)
    down = stats.bayes_rates(c, t, higher_is_better=False)
    assert up.chance_to_beat_control == pytest.approx(1 - down.chance_to_beat_control, abs=1e-4)
    assert down.expected_loss > up.expected_loss


def test_bayes_means_matches_monte_carlo():
    rng = np.random.default_rng(3)
    c, t = stats.Aggregate.of(rng.normal(5, 2, 300)), stats.Aggregate.of(rng.normal(5.2, 2, 300))
    got = stats.bayes_means(c, t)
    se = math.sqrt(c.variance / c.n + t.variance / t.n)
    draws = rng.normal(t.mean - c.mean, se, 2_000_000)
    assert got.chance_to_beat_control == pytest.approx((draws > 0).mean(), abs=0.002)
    assert got.expected_loss == pytest.approx(np.maximum(-draws, 0).mean(), rel=0.01)


def test_msprt_matches_the_closed_form_and_its_confidence_sequence():
    c, t = stats.Aggregate.of([1.0, 2, 3, 4, 5] * 40), stats.Aggregate.of([2.0, 3, 4, 5, 6] * 40)
    tau2 = 0.25
    got = stats.msprt(c, t, tau2=tau2, alpha=0.05)
    v = c.variance / c.n + t.variance / t.n
    d = 1.0
    lam = math.sqrt(v / (v + tau2)) * math.exp(d * d * tau2 / (2 * v * (v + tau2)))
    assert got.p_value == pytest.approx(min(1, 1 / lam))
    # the confidence sequence excludes theta exactly where the mixture LR at theta >= 1/alpha
    low, high = got.ci
    for theta, inside in ((low + 1e-6, True), (low - 1e-6, False), (high - 1e-6, True)):
        shifted = (d - theta) ** 2
        lam_theta = math.sqrt(v / (v + tau2)) * math.exp(shifted * tau2 / (2 * v * (v + tau2)))
        assert (lam_theta < 20) == inside


def test_srm_matches_scipy_chisquare():
    units, weights = [5100, 4900], [0.5, 0.5]
    assert stats.srm_pvalue(units, weights) == pytest.approx(
        st.chisquare(units, [5000, 5000]).pvalue
    )
    assert stats.srm_pvalue([5000, 4800, 2000], [0.4, 0.4, 0.2]) == pytest.approx(
        st.chisquare([5000, 4800, 2000], [4720, 4720, 2360]).pvalue
    )
    assert stats.srm_pvalue([10_000, 9_500], [0.5, 0.5]) < 0.001  # flagged
    assert stats.srm_pvalue([10_000, 9_900], [0.5, 0.5]) > 0.001  # fine


@pytest.mark.parametrize("seed", range(4))
def test_holm_and_bh_match_statsmodels(seed):
    pvals = [*np.random.default_rng(seed).uniform(0, 0.2, 12).tolist(), 0.001, 0.9]
    assert stats.holm(pvals) == pytest.approx(multipletests(pvals, method="holm")[1].tolist())
    assert stats.benjamini_hochberg(pvals) == pytest.approx(
        multipletests(pvals, method="fdr_bh")[1].tolist()
    )


@pytest.mark.parametrize(
    ("mean", "mde", "alpha", "power"), [(0.1, 0.1, 0.05, 0.8), (0.3, 0.05, 0.01, 0.9)]
)
def test_required_sample_size_rates_matches_statsmodels(mean, mde, alpha, power):
    p2 = mean * (1 + mde)
    effect = (p2 - mean) / math.sqrt((mean * (1 - mean) + p2 * (1 - p2)) / 2)
    ref = NormalIndPower().solve_power(effect_size=effect, alpha=alpha, power=power, ratio=1)
    got = stats.required_sample_size(mean, mde, alpha, power)
    assert got == pytest.approx(ref, rel=0.002)  # statsmodels also counts the far tail


def test_required_sample_size_means_matches_statsmodels():
    ref = NormalIndPower().solve_power(effect_size=0.5 / 4, alpha=0.05, power=0.8, ratio=1)
    assert stats.required_sample_size(10, 0.05, 0.05, 0.8, variance=16) == pytest.approx(
        ref, rel=0.002
    )
