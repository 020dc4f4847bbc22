"""GetResults end to end: gathers each metric's aggregates from where they are kept, analyses
them (results.analyze) and keeps the running minimum of the always-valid p-values in Redis.

Metrics the analytics service knows (analytics_source.SOURCES: success, latency, time to
first token, rating) come from its per-variant request aggregates when an analytics address
is configured and no per-user outcomes were recorded for them; every other metric, and every
metric without analytics, from this service's per-user outcome counters (RecordOutcomes).
"""

from __future__ import annotations

import dataclasses

from services.experiments.analytics_source import NOT_FROM_ANALYTICS, SOURCES, AnalyticsSource
from services.experiments.core import ExperimentStore, VariantCounts
from services.experiments.model import Experiment
from services.experiments.results import MetricData, Results, analyze
from services.experiments.settings import ExperimentsSettings


def design_effects(counts: VariantCounts) -> list[float] | None:
    """Per variant, K = sum(m_u^2) / sum(m_u) over its units' Assign calls m_u (>= 1, = 1
    when every unit was assigned once). None when no Assign calls were counted."""
    if not any(counts.assignments):
        return None
    return [
        max(sq / n, 1.0) if n else 1.0
        for n, sq in zip(counts.assignments, counts.assignments_squared, strict=True)
    ]


def _analytics_note(
    names: list[str], effects: list[float] | None, variants: list[str], bound: bool
) -> str:
    head = (
        f"{', '.join(names)}: from the analytics service, one observation per request (per "
        "rating for rating); the sample-ratio check counts users. "
    )
    if effects is None:
        why = (
            "design_effect_bound is off"
            if not bound
            else "no Assign calls are counted for this bucket version"
        )
        return head + (
            f"Requests are treated as independent ({why}): if users send several requests "
            "each, the p-values are too small."
        )
    spread = ", ".join(f"{v} {k:.2f}" for v, k in zip(variants, effects, strict=True))
    return head + (
        "A user's requests are correlated, so each variant's variance is multiplied by the "
        f"bound sum(m^2)/sum(m) over its users' request counts m: {spread} (conservative; "
        "per-user outcomes via RecordOutcomes need no such bound)."
    )


async def gather_metrics(
    store: ExperimentStore,
    exp: Experiment,
    counts: VariantCounts,
    analytics: AnalyticsSource | None,
    settings: ExperimentsSettings,
) -> tuple[dict[str, MetricData], list[str]]:
    """Per metric: this service's per-user outcomes when any were recorded for it (the user
    is the unit of randomisation, so they make the better test), else the analytics
    service's request-level aggregates when it has the metric, else (empty) outcomes."""
    outcomes = await store.aggregates(exp)
    data = {m.name: MetricData(outcomes[m.name]) for m in exp.metrics}
    notes: list[str] = []
    if analytics is None:
        return data, notes
    wanted = []
    for metric in exp.metrics:
        recorded = any(a.n for a in outcomes[metric.name])
        if metric.name in SOURCES and SOURCES[metric.name].kind != metric.kind:
            notes.append(
                f"{metric.name}: the analytics service has it as a "
                f"{SOURCES[metric.name].kind}, the experiment declares a {metric.kind}; "
                "it comes from recorded outcomes"
            )
        elif metric.name in NOT_FROM_ANALYTICS and not recorded:
            notes.append(
                f"{metric.name}: the analytics service keeps no sum of squares of token "
                "counts (so no variance); record it per user with RecordOutcomes"
            )
        elif metric.name in SOURCES and recorded:
            notes.append(
                f"{metric.name}: from recorded per-user outcomes, preferred over the "
                "analytics service's request-level aggregates (users are the randomisation "
                "unit)"
            )
        elif metric.name in SOURCES:
            wanted.append(metric)
    if not wanted:
        return data, notes
    fetched, window_notes = await analytics.aggregates(exp, wanted)
    effects = design_effects(counts) if settings.design_effect_bound else None
    for metric in wanted:
        unit = SOURCES[metric.name].unit
        data[metric.name] = MetricData(fetched[metric.name], "analytics", unit, effects)
    names = [v.name for v in exp.variants]
    note = _analytics_note([m.name for m in wanted], effects, names, settings.design_effect_bound)
    return data, [note, *window_notes, *notes]


async def experiment_results(
    store: ExperimentStore,
    exp: Experiment,
    settings: ExperimentsSettings,
    analytics: AnalyticsSource | None = None,
) -> Results:
    counts = await store.variant_counts(exp)
    data, notes = await gather_metrics(store, exp, counts, analytics, settings)
    floors = await store.sequential_floors(exp)
    res = analyze(exp, counts.units, data, settings, floors, notes)
    await store.lower_sequential_floors(exp, res.sequential)
    return dataclasses.replace(res, assignments_per_variant=counts.assignments)
