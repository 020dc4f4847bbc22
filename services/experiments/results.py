"""Experiment results: the statistics of stats.py applied to per-variant aggregates.

`analyze()` is pure: it takes the experiment, the units assigned per variant and, per
metric, one `stats.Aggregate` per variant (observations, sum and sum of squares of the
observed values) — from this service's per-user outcome counters or the analytics service's
per-request aggregates (`MetricData` says which, and how correlated requests are).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from services.experiments import stats
from services.experiments.model import Experiment, Goal, Metric, MetricKind
from services.experiments.settings import ExperimentsSettings


class Recommendation(StrEnum):
    SHIP = "ship"
    KEEP_RUNNING = "keep_running"
    STOP = "stop"


@dataclass(frozen=True)
class MetricData:
    """One metric's per-variant aggregates and what they are made of.

    design_effects (one per variant, >= 1): when an observation is a request rather than a
    user, a user's requests are correlated and the aggregates overstate the information in
    them. Var(mean) <= sigma^2 * sum(m_u^2) / (sum m_u)^2 for users with m_u requests each
    (Cauchy-Schwarz, whatever the correlation), i.e. the variance of independent
    observations times K = sum(m_u^2) / sum(m_u). The tests use n / K observations."""

    aggregates: list[stats.Aggregate]
    source: str = "outcomes"  # or "analytics"
    unit: str = "user"  # "user", "request" or "rating"
    design_effects: list[float] | None = None

    def effective(self) -> list[stats.Aggregate]:
        if not self.design_effects:
            return self.aggregates
        return [
            stats.Aggregate(a.n / k, a.sum / k, a.sum_squares / k) if k > 1 else a
            for a, k in zip(self.aggregates, self.design_effects, strict=True)
        ]


@dataclass(frozen=True)
class VariantResult:
    variant: str
    comparison: stats.Comparison
    bayesian: stats.Bayesian
    sequential: stats.Sequential
    adjusted_p_value: float = 1.0
    significant: bool = False

    @property
    def improved(self) -> bool:
        """The variant moved the metric in the metric's good direction."""
        return self.comparison.absolute_lift > 0


@dataclass(frozen=True)
class MetricResult:
    metric: Metric
    aggregates: list[stats.Aggregate]  # as observed (before any design effect)
    comparisons: list[VariantResult]
    guardrail: bool
    source: str = "outcomes"
    unit: str = "user"
    design_effects: list[float] = field(default_factory=list)  # per variant, 1: none
    effective: list[stats.Aggregate] = field(default_factory=list)  # what the tests used


@dataclass(frozen=True)
class Results:
    experiment: Experiment
    units_per_variant: list[int]
    srm_p_value: float
    srm_detected: bool
    metrics: list[MetricResult]
    required_units_per_variant: int
    sample_size_reached: bool
    recommendation: Recommendation
    reason: str
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)
    # Sequential p-values as reported (running minima), by sequential_field(...).
    sequential: dict[str, float] = field(default_factory=dict)
    assignments_per_variant: list[int] = field(default_factory=list)


def sequential_field(source: str, metric: str, variant: str) -> str:
    return f"{source}|{metric}|{variant}"


def _tau2(metric: Metric, control: stats.Aggregate, mde: float, scale: float) -> float:
    """mSPRT mixing variance: the squared effect we hope to detect (scale * MDE * baseline),
    falling back to the metric's own spread when the baseline is 0."""
    base = abs(control.mean) if control.mean else math.sqrt(control.variance or 0.25)
    return (scale * mde * base) ** 2


def _compare(
    metric: Metric,
    control: stats.Aggregate,
    variant: stats.Aggregate,
    name: str,
    alpha: float,
    mde: float,
    tau_scale: float,
    floor: float = 1.0,
) -> VariantResult:
    higher = metric.goal == Goal.INCREASE
    rate = metric.kind == MetricKind.RATE
    if rate:
        comparison = stats.two_proportion_ztest(control, variant, alpha)
        bayes = stats.bayes_rates(control, variant, higher)
    else:
        comparison = stats.welch_ttest(control, variant, alpha)
        bayes = stats.bayes_means(control, variant, higher)
    sequential = stats.msprt(
        control, variant, _tau2(metric, control, mde, tau_scale), alpha, rate=rate
    )
    if floor < sequential.p_value:  # the running minimum over looks (always valid too)
        sequential = stats.Sequential(floor, sequential.ci)
    if not higher:  # report lifts so that positive means "better"
        comparison = stats.Comparison(
            comparison.control_mean,
            comparison.variant_mean,
            -comparison.absolute_lift,
            -comparison.relative_lift,
            (-comparison.relative_ci[1], -comparison.relative_ci[0]),
            -comparison.statistic,
            comparison.p_value,
        )
    return VariantResult(name, comparison, bayes, sequential)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def analyze(
    exp: Experiment,
    units_per_variant: list[int],
    aggregates: Mapping[str, list[stats.Aggregate] | MetricData],
    settings: ExperimentsSettings,
    sequential_floors: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
) -> Results:
    """sequential_floors: the smallest always-valid p-value reported before, per
    sequential_field(source, metric, variant); the reported one is the running minimum."""
    alpha = exp.alpha or settings.default_alpha
    power = exp.target_power or settings.default_power
    mde = exp.minimum_detectable_effect or settings.default_minimum_detectable_effect
    names = [v.name for v in exp.variants]
    floors = sequential_floors or {}

    srm_p = stats.srm_pvalue(units_per_variant, exp.weights)
    srm = srm_p < settings.srm_threshold

    metric_results: list[MetricResult] = []
    for index, metric in enumerate(exp.metrics):
        data = aggregates.get(metric.name)
        if data is None:
            data = MetricData([stats.Aggregate(0, 0.0, 0.0)] * len(names))
        elif not isinstance(data, MetricData):
            data = MetricData(list(data))
        aggs = data.effective()
        control = aggs[0]
        comparisons = [
            _compare(
                metric,
                control,
                aggs[i],
                names[i],
                alpha,
                mde,
                settings.sequential_tau,
                floors.get(sequential_field(data.source, metric.name, names[i]), 1.0),
            )
            for i in range(1, len(names))
            if control.n >= 2 and aggs[i].n >= 2
        ]
        metric_results.append(
            MetricResult(
                metric,
                data.aggregates,
                comparisons,
                guardrail=index > 0,
                source=data.source,
                unit=data.unit,
                design_effects=list(data.design_effects or [1.0] * len(names)),
                effective=aggs,
            )
        )

    # Required sample size for the primary metric, from the control's baseline (in the
    # metric's effective observations).
    primary = metric_results[0]
    control = primary.effective[0]
    required = 0
    if control.n >= 2:
        if primary.metric.kind == MetricKind.RATE:
            required = stats.required_sample_size(control.mean, mde, alpha, power)
        else:
            required = stats.required_sample_size(
                control.mean, mde, alpha, power, variance=control.variance
            )
    observed = [a.n for a in primary.effective]
    min_units = max(required, settings.min_units_per_variant)
    reached = control.n >= 2 and min(observed) >= min_units

    # Holm across every (metric, variant) comparison; the always-valid sequential p-values
    # are Bonferroni-corrected over the same family.
    family = [c for m in metric_results for c in m.comparisons]
    adjusted = stats.holm([c.comparison.p_value for c in family])
    m = max(len(family), 1)
    it = iter(adjusted)
    sequential: dict[str, float] = {}
    for mr in metric_results:
        for i, c in enumerate(mr.comparisons):
            adj = next(it)
            significant = (reached and adj < alpha) or c.sequential.p_value < alpha / m
            mr.comparisons[i] = VariantResult(
                c.variant, c.comparison, c.bayesian, c.sequential, adj, significant
            )
            sequential[sequential_field(mr.source, mr.metric.name, c.variant)] = (
                c.sequential.p_value
            )

    recommendation, reason = _recommend(
        exp, metric_results, srm, srm_p, reached, observed, min_units, settings
    )
    return Results(
        exp,
        units_per_variant,
        srm_p,
        srm,
        metric_results,
        required,
        reached,
        recommendation,
        reason,
        alpha,
        list(notes),
        sequential,
    )


def _recommend(
    exp: Experiment,
    metrics: list[MetricResult],
    srm: bool,
    srm_p: float,
    reached: bool,
    observed: list[int],
    min_units: int,
    settings: ExperimentsSettings,
) -> tuple[Recommendation, str]:
    if srm:
        return (
            Recommendation.STOP,
            f"sample ratio mismatch (chi-square p = {srm_p:.2g} < {settings.srm_threshold}): "
            "units are not split as the weights say, so assignment or logging is broken; "
            "fix it before trusting any result",
        )
    primary, guardrails = metrics[0], metrics[1:]
    for g in guardrails:
        for c in g.comparisons:
            if c.significant and not c.improved:
                return (
                    Recommendation.STOP,
                    f"variant {c.variant!r} harms guardrail {g.metric.name!r} "
                    f"({_pct(-c.comparison.relative_lift)} worse, adjusted p = "
                    f"{c.adjusted_p_value:.3g})",
                )
    if not primary.comparisons:
        return (
            Recommendation.KEEP_RUNNING,
            f"not enough data on {primary.metric.name!r} yet",
        )
    winners = [c for c in primary.comparisons if c.significant and c.improved]
    if winners:
        best = max(winners, key=lambda c: c.comparison.relative_lift)
        lo, hi = best.comparison.relative_ci
        return (
            Recommendation.SHIP,
            f"ship {best.variant!r}: {primary.metric.name} {_pct(best.comparison.relative_lift)}"
            f" vs control (95% CI {_pct(lo)} to {_pct(hi)}), chance to beat control "
            f"{best.bayesian.chance_to_beat_control:.1%}",
        )
    losers = [c for c in primary.comparisons if c.significant and not c.improved]
    if losers and len(losers) == len(primary.comparisons):
        return (
            Recommendation.STOP,
            f"every variant is worse than control on {primary.metric.name} "
            f"(e.g. {losers[0].variant!r} {_pct(losers[0].comparison.relative_lift)}); "
            "keep control",
        )
    if reached:
        return (
            Recommendation.STOP,
            f"no significant difference on {primary.metric.name} at the planned sample size "
            f"({min(observed):.0f} {_unit(primary)} per variant): the variants are equivalent "
            "within the minimum detectable effect; keep control",
        )
    return (
        Recommendation.KEEP_RUNNING,
        f"{min(observed):.0f} of {min_units} {_unit(primary)} per variant so far and no "
        "significant difference yet; the sequential test allows looking again any time",
    )


def _unit(metric: MetricResult) -> str:
    plural = f"{metric.unit}s"
    if any(k > 1 for k in metric.design_effects):
        return f"effective {plural}"
    return plural if metric.unit != "user" else "units"
