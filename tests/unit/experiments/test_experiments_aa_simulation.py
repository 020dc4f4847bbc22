"""A/A simulation: false-positive rates of the fixed and the sequential tests under peeking."""

from __future__ import annotations

import numpy as np
import pytest

from services.experiments import stats

ALPHA = 0.05
SIMULATIONS = 2000
DAYS = 20
UNITS_PER_DAY = 250  # per arm
RATE = 0.1
TAU2 = (0.1 * RATE) ** 2  # mixing prior scaled to a 10% relative effect


@pytest.mark.slow
def test_aa_false_positive_rates_under_daily_peeking():
    rng = np.random.default_rng(2026)
    conv = rng.binomial(UNITS_PER_DAY, RATE, size=(SIMULATIONS, DAYS, 2)).cumsum(axis=1)
    fixed_final = fixed_peeking = sequential_peeking = 0
    for sim in range(SIMULATIONS):
        fixed_hit = seq_hit = False
        for day in range(DAYS):
            n = UNITS_PER_DAY * (day + 1)
            c = stats.Aggregate.rate(n, int(conv[sim, day, 0]))
            t = stats.Aggregate.rate(n, int(conv[sim, day, 1]))
            if not seq_hit and stats.msprt(c, t, TAU2, ALPHA, rate=True).p_value <= ALPHA:
                seq_hit = True
            if not fixed_hit or day == DAYS - 1:
                significant = stats.two_proportion_ztest(c, t).p_value < ALPHA
                fixed_hit = fixed_hit or significant
                if day == DAYS - 1:
                    fixed_final += significant
        fixed_peeking += fixed_hit
        sequential_peeking += seq_hit
    rates = {
        "fixed test, one look at the end": fixed_final / SIMULATIONS,
        "fixed test, peeking daily": fixed_peeking / SIMULATIONS,
        "sequential (mSPRT), peeking daily": sequential_peeking / SIMULATIONS,
    }
    print(f"\nA/A false-positive rates, alpha={ALPHA}, {SIMULATIONS} sims x {DAYS} daily looks:")
    for name, rate in rates.items():
        print(f"  {name:<36} {rate:.4f}")
    se = (ALPHA * (1 - ALPHA) / SIMULATIONS) ** 0.5
    assert abs(rates["fixed test, one look at the end"] - ALPHA) < 3 * se
    assert rates["fixed test, peeking daily"] > 2 * ALPHA  # why peeking needs the sequential test
    assert rates["sequential (mSPRT), peeking daily"] <= ALPHA + se


@pytest.mark.slow
def test_aa_false_positive_rates_for_a_skewed_mean_metric():
    """Latency-like (exponential) per-unit values: Welch at the end, mSPRT at every look."""
    rng = np.random.default_rng(7)
    sims, days, per_day, mean = 1000, 20, 100, 200.0
    tau2 = (0.1 * mean) ** 2
    fixed = sequential = 0
    for _ in range(sims):
        x = rng.exponential(mean, size=(2, days * per_day))
        s1 = x.cumsum(axis=1)
        s2 = (x * x).cumsum(axis=1)
        hit = False
        for day in range(days):
            k = (day + 1) * per_day - 1
            c = stats.Aggregate(k + 1, s1[0, k], s2[0, k])
            t = stats.Aggregate(k + 1, s1[1, k], s2[1, k])
            if not hit and stats.msprt(c, t, tau2, ALPHA).p_value <= ALPHA:
                hit = True
        fixed += stats.welch_ttest(c, t).p_value < ALPHA
        sequential += hit
    print(f"\nA/A, exponential means, {sims} sims x {days} looks:")
    print(f"  Welch t-test, one look at the end     {fixed / sims:.4f}")
    print(f"  sequential (mSPRT), peeking daily     {sequential / sims:.4f}")
    se = (ALPHA * (1 - ALPHA) / sims) ** 0.5
    assert abs(fixed / sims - ALPHA) < 3 * se
    assert sequential / sims <= ALPHA + se
