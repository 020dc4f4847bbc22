"""Experiment statistics on per-variant aggregates (pure functions, no I/O).

Every test takes `Aggregate`s — units n, sum of the per-unit values and sum of their
squares — which is all the analytics counters need to keep. For a rate (success, thumbs-up)
the per-unit value is 0/1, so sum is the number of conversions. Formulas and references
are in docs/experiments.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import stats as st


@dataclass(frozen=True)
class Aggregate:
    n: int  # units (users) observed
    sum: float  # sum of per-unit values (rates: conversions)
    sum_squares: float = 0.0  # sum of squared per-unit values (rates: ignored)

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1) of the per-unit values."""
        if self.n < 2:
            return 0.0
        var = (self.sum_squares - self.sum * self.sum / self.n) / (self.n - 1)
        return max(var, 0.0)

    @classmethod
    def rate(cls, n: int, conversions: float) -> Aggregate:
        return cls(n, conversions, conversions)

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Aggregate:
        arr = np.asarray(values, dtype=float)
        return cls(len(arr), float(arr.sum()), float((arr * arr).sum()))


@dataclass(frozen=True)
class Comparison:
    """Treatment against control on one metric (fixed-horizon frequentist test)."""

    control_mean: float
    variant_mean: float
    absolute_lift: float
    relative_lift: float
    relative_ci: tuple[float, float]  # delta-method CI of the relative lift
    statistic: float
    p_value: float  # two-sided


_NORMAL = NormalDist()


def _z(alpha: float) -> float:
    return _NORMAL.inv_cdf(1 - alpha / 2)


def _two_sided_normal_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def _relative_ci(
    mc: float, mt: float, var_mc: float, var_mt: float, crit: float
) -> tuple[float, float, float]:
    """Relative lift mt/mc - 1 and its delta-method CI, where var_m* are the variances of
    the two means (Var(mt/mc) ~ var_mt/mc^2 + mt^2 var_mc/mc^4 for independent groups)."""
    if mc == 0:
        return math.nan, math.nan, math.nan
    lift = mt / mc - 1
    se = math.sqrt(var_mt / mc**2 + mt**2 * var_mc / mc**4)
    return lift, lift - crit * se, lift + crit * se


def _rate_mean(agg: Aggregate) -> float:
    return min(max(agg.mean, 0.0), 1.0)


def two_proportion_ztest(control: Aggregate, variant: Aggregate, alpha: float = 0.05) -> Comparison:
    """Pooled two-proportion z-test (as statsmodels' proportions_ztest)."""
    pc, pt = _rate_mean(control), _rate_mean(variant)
    pooled = (control.sum + variant.sum) / (control.n + variant.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / control.n + 1 / variant.n))
    z = (pt - pc) / se if se > 0 else 0.0
    p = _two_sided_normal_p(z)
    lift, low, high = _relative_ci(
        pc, pt, pc * (1 - pc) / control.n, pt * (1 - pt) / variant.n, _z(alpha)
    )
    return Comparison(pc, pt, pt - pc, lift, (low, high), z, p)


def welch_ttest(control: Aggregate, variant: Aggregate, alpha: float = 0.05) -> Comparison:
    """Welch's unequal-variance t-test (as scipy's ttest_ind(equal_var=False)); relative
    lift CI by the delta method with the Welch degrees of freedom."""
    mc, mt = control.mean, variant.mean
    vc, vt = control.variance / control.n, variant.variance / variant.n
    se = math.sqrt(vc + vt)
    if se == 0:
        # no spread at all: the lift is exact
        lift = mt / mc - 1 if mc else math.nan
        return Comparison(mc, mt, mt - mc, lift, (lift, lift), 0.0, 1.0 if mt == mc else 0.0)
    t = (mt - mc) / se
    df = (vc + vt) ** 2 / (vc**2 / (control.n - 1) + vt**2 / (variant.n - 1))
    p = float(2 * st.t.sf(abs(t), df))
    crit = float(st.t.ppf(1 - alpha / 2, df))
    lift, low, high = _relative_ci(mc, mt, vc, vt, crit)
    return Comparison(mc, mt, mt - mc, lift, (low, high), t, p)


# -- Bayesian -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bayesian:
    chance_to_beat_control: float
    # Expected loss of choosing the variant over control, in the metric's units (what you
    # give up, on average, in the worlds where the variant is actually worse).
    expected_loss: float


def bayes_rates(
    control: Aggregate, variant: Aggregate, higher_is_better: bool = True, grid: int = 4001
) -> Bayesian:
    """Beta(1 + conversions, 1 + failures) posteriors (uniform prior), integrated on a grid:
    P(T > C) = E_T[F_C(T)];  E[max(C - T, 0)] = E_T[mu_C (1 - F_{a+1,b}(T)) - T (1 - F_C(T))]."""
    ac, bc = 1 + control.sum, 1 + control.n - control.sum
    at, bt = 1 + variant.sum, 1 + variant.n - variant.sum
    if not higher_is_better:  # a lower rate is better: compare failures instead
        ac, bc, at, bt = bc, ac, bt, at
    lo = min(st.beta.ppf(1e-10, ac, bc), st.beta.ppf(1e-10, at, bt))
    hi = max(st.beta.isf(1e-10, ac, bc), st.beta.isf(1e-10, at, bt))
    x = np.linspace(lo, hi, grid)
    ft = st.beta.pdf(x, at, bt)
    fc_cdf = st.beta.cdf(x, ac, bc)
    chance = np.trapezoid(ft * fc_cdf, x)
    mu_c = ac / (ac + bc)
    tail = mu_c * st.beta.sf(x, ac + 1, bc) - x * st.beta.sf(x, ac, bc)
    loss = np.trapezoid(ft * tail, x)
    return Bayesian(float(min(max(chance, 0.0), 1.0)), float(max(loss, 0.0)))


def bayes_means(control: Aggregate, variant: Aggregate, higher_is_better: bool = True) -> Bayesian:
    """Normal approximation (flat prior): D = mean_T - mean_C ~ N(d, se^2);
    chance = Phi(d/se), loss = E[max(-D, 0)] = se*phi(d/se) - d*Phi(-d/se)."""
    d = variant.mean - control.mean
    if not higher_is_better:
        d = -d
    se = math.sqrt(control.variance / control.n + variant.variance / variant.n)
    if se == 0:
        return Bayesian(1.0 if d > 0 else 0.0 if d < 0 else 0.5, max(-d, 0.0))
    z = d / se
    return Bayesian(float(st.norm.cdf(z)), float(se * st.norm.pdf(z) - d * st.norm.cdf(-z)))


# -- sequential (always valid) --------------------------------------------------------------


@dataclass(frozen=True)
class Sequential:
    p_value: float  # always-valid: P(ever <= alpha | no effect) <= alpha
    ci: tuple[float, float]  # confidence sequence for the absolute difference


def msprt(
    control: Aggregate,
    variant: Aggregate,
    tau2: float,
    alpha: float = 0.05,
    rate: bool = False,
) -> Sequential:
    """Mixture SPRT (Johari, Koomen, Pekelis & Walsh 2017) for the difference of means,
    normal mixture theta ~ N(0, tau2) over the effect, with V = Var(mean_T - mean_C):

        Lambda = sqrt(V / (V + tau2)) * exp(d^2 tau2 / (2 V (V + tau2))),  p = min(1, 1/Lambda)

    Rejecting whenever p <= alpha, at any number of looks, keeps the type-I error <= alpha.
    The matching confidence sequence is d +- sqrt(V (V + tau2)/tau2 *
    (2 log(1/alpha) + log((V + tau2)/V)))."""
    if rate:
        pc, pt = _rate_mean(control), _rate_mean(variant)
        v = pc * (1 - pc) / control.n + pt * (1 - pt) / variant.n
    else:
        v = control.variance / control.n + variant.variance / variant.n
    d = variant.mean - control.mean
    if v <= 0 or tau2 <= 0:
        return Sequential(1.0, (-math.inf, math.inf))
    log_lambda = 0.5 * math.log(v / (v + tau2)) + d * d * tau2 / (2 * v * (v + tau2))
    p = 1.0 if log_lambda <= 0 else math.exp(-log_lambda)
    half = math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v)))
    return Sequential(min(p, 1.0), (d - half, d + half))


# -- checks and corrections -----------------------------------------------------------------


def srm_pvalue(units: Sequence[int], weights: Sequence[float]) -> float:
    """Chi-square goodness of fit of the units per variant against the traffic weights."""
    total = sum(units)
    if total == 0:
        return 1.0
    wsum = sum(weights)
    expected = [total * w / wsum for w in weights]
    keep = [i for i, e in enumerate(expected) if e > 0]
    if any(units[i] for i in range(len(units)) if i not in keep):
        return 0.0  # units in a variant that should get none
    if len(keep) < 2:
        return 1.0
    return float(st.chisquare([units[i] for i in keep], [expected[i] for i in keep]).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error rate)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i], reverse=True)
    out = [0.0] * m
    running = 1.0
    for k, i in enumerate(order):
        rank = m - k
        running = min(running, pvalues[i] * m / rank)
        out[i] = min(running, 1.0)
    return out


def required_sample_size(
    baseline_mean: float,
    mde: float,
    alpha: float = 0.05,
    power: float = 0.8,
    variance: float | None = None,
) -> int:
    """Units per variant for a two-sided test to detect a relative lift `mde` with `power`:
    n = (z_{1-alpha/2} + z_{power})^2 * (s_c^2 + s_t^2) / delta^2, delta = mde*|baseline|.
    Rates (variance None): s^2 = p(1-p) for p = baseline and baseline*(1+mde)."""
    delta = abs(mde * baseline_mean)
    if delta == 0:
        return 0
    if variance is None:
        p1 = baseline_mean
        p2 = min(max(baseline_mean * (1 + mde), 0.0), 1.0)
        delta = abs(p2 - p1)
        if delta == 0:
            return 0
        spread = p1 * (1 - p1) + p2 * (1 - p2)
    else:
        spread = 2 * variance
    z = _z(alpha) + float(st.norm.ppf(power))
    return math.ceil(z * z * spread / (delta * delta))
