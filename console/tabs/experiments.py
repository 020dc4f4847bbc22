"""A/B testing: the tenant's experiments; create, start, stop; results with lifts and their
confidence intervals, the SRM check, the sequential p-value as this session saw it over time,
the recommendation; a sample-size calculator."""

from __future__ import annotations

import math
import time
from statistics import NormalDist

import altair as alt
import pandas as pd
import streamlit as st

from console import ui
from console.client import Gateway

BASE_MODEL = "(base model)"
MAX_VARIANTS = 8
# Metric name -> (kind, goal); rating and the success / latency family come from analytics.
METRICS = {
    "success": ("METRIC_KIND_RATE", "METRIC_GOAL_INCREASE"),
    "rating": ("METRIC_KIND_MEAN", "METRIC_GOAL_INCREASE"),
    "latency_ms": ("METRIC_KIND_MEAN", "METRIC_GOAL_DECREASE"),
    "ttft_ms": ("METRIC_KIND_MEAN", "METRIC_GOAL_DECREASE"),
    "thumbs_up": ("METRIC_KIND_RATE", "METRIC_GOAL_INCREASE"),
}
STATUS = {
    "EXPERIMENT_STATUS_DRAFT": "draft",
    "EXPERIMENT_STATUS_RUNNING": "running",
    "EXPERIMENT_STATUS_STOPPED": "stopped",
}


def render(api: Gateway) -> None:
    experiments = ui.attempt(api.experiments)
    if experiments is None:
        return
    _table(experiments)
    with st.expander("New experiment", expanded=not experiments):
        _create_form(api)
    if experiments:
        keys = [e["key"] for e in experiments]
        key = st.selectbox("Experiment", keys, key="ab_experiment")
        _controls(api, next(e for e in experiments if e["key"] == key))
        _results(api, key)
    with st.expander("Sample-size calculator"):
        _calculator()


def _table(experiments: list[dict]) -> None:
    if not experiments:
        st.info("No experiments yet: create one below.")
        return
    rows = [
        {
            "key": e["key"],
            "status": STATUS.get(e["status"], e["status"]),
            "variants": ", ".join(
                f"{v['name']} {v['traffic_weight']:.0%}: "
                + (" + ".join(a["name"] for a in v.get("adapters", [])) or BASE_MODEL)
                for v in e["variants"]
            ),
            "coverage": e.get("coverage", 1.0),
            "primary metric": e.get("primary_metric", {}).get("name", ""),
        }
        for e in experiments
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True)


def _variant_name(i: int) -> str:
    return "control" if i == 0 else "treatment" if i == 1 else f"treatment-{i}"


def _create_form(api: Gateway) -> None:
    adapters = ui.adapter_names(api)
    # Outside the form: changing the count redraws the form with that many variants.
    count = st.number_input("Variants", 2, MAX_VARIANTS, 2, key="ab_count")
    with st.form("new_experiment", clear_on_submit=False):
        top = st.columns([2, 3])
        key = top[0].text_input("Key", placeholder="support-v2", help="lowercase, digits, - or _")
        description = top[1].text_input("Description")
        variants = []
        for i in range(count):
            cols = st.columns([1, 2, 1])
            name = cols[0].text_input(
                f"Variant {i + 1}" + (" (control)" if i == 0 else ""),
                value=_variant_name(i),
                key=f"ab_name_{i}",
            )
            options = [BASE_MODEL, *adapters]
            adapter = cols[1].selectbox(
                "Adapter", options, index=min(i + 1, len(options) - 1), key=f"ab_adapter_{i}"
            )
            weight = cols[2].number_input(
                "Weight", 0.0, 1.0, 1.0 / count, 0.05, key=f"ab_weight_{i}"
            )
            variants.append((name, adapter, weight))
        cols = st.columns(4)
        coverage = cols[0].slider("Coverage", 0.0, 1.0, 1.0, 0.05)
        metric = cols[1].selectbox("Primary metric", list(METRICS))
        mde = cols[2].number_input("Min. detectable effect", 0.0, 10.0, 0.05, 0.01)
        power = cols[3].number_input("Power", 0.5, 0.99, 0.8, 0.05)
        guardrails = st.multiselect(
            "Guardrail metrics",
            list(METRICS),
            key="ab_guardrails",
            help="watched for harm; the primary metric decides",
        )
        cols = st.columns(3)
        namespace = cols[0].text_input("Namespace (optional)", help="mutually exclusive tests")
        start = cols[1].number_input("Namespace from", 0.0, 1.0, 0.0, 0.1)
        end = cols[2].number_input("Namespace to", 0.0, 1.0, 1.0, 0.1)
        if not st.form_submit_button("Create experiment", type="primary"):
            return
    kind, goal = METRICS[metric]
    body = {
        "key": key.strip(),
        "description": description,
        "variants": [
            {
                "name": name,
                "traffic_weight": weight,
                "adapters": [] if adapter == BASE_MODEL else [{"name": adapter}],
            }
            for name, adapter, weight in variants
        ],
        "coverage": coverage,
        "primary_metric": {"name": metric, "kind": kind, "goal": goal},
        "guardrail_metrics": [
            {"name": g, "kind": METRICS[g][0], "goal": METRICS[g][1]}
            for g in guardrails
            if g != metric
        ],
        "minimum_detectable_effect": mde,
        "target_power": power,
    }
    if namespace:
        body["namespace"] = {"name": namespace, "range_start": start, "range_end": end}
    created = ui.attempt(api.create_experiment, body)
    if created:
        st.session_state["ab_experiment"] = created["key"]
        st.toast(f"Experiment {created['key']} created (draft)")
        st.rerun()


def _controls(api: Gateway, experiment: dict) -> None:
    status = STATUS.get(experiment["status"], experiment["status"])
    cols = st.columns([2, 1, 1])
    cols[0].markdown(f"**{experiment['key']}** is **{status}**")
    if cols[1].button("Start", disabled=status != "draft", key="ab_start"):
        _act(api, experiment["key"], "start")
    if cols[2].button("Stop", disabled=status != "running", key="ab_stop"):
        _act(api, experiment["key"], "stop")


def _act(api: Gateway, key: str, action: str) -> None:
    if ui.attempt(api.experiment_action, key, action) is not None:
        st.toast(f"Experiment {key}: {action}")
        st.rerun()


def _results(api: Gateway, key: str) -> None:
    results = ui.attempt(api.results, key)
    if results is None:
        return
    if results["srm_detected"]:
        st.warning(
            f"Sample ratio mismatch (p = {results['srm_p_value']:.2g}): the split does not "
            "match the weights; the assignment or logging is broken. Do not trust these results.",
            icon=":material/warning:",
        )
    recommendation = results["recommendation"].removeprefix("RECOMMENDATION_").lower()
    show = {"ship": st.success, "stop": st.error}.get(recommendation, st.info)
    words = recommendation.replace("_", " ")
    show(f"Recommendation: **{words}**. {results['recommendation_reason']}")
    variants = [v["name"] for v in results["experiment"]["variants"]]
    cols = st.columns(3)
    cols[0].metric("Units per variant", " / ".join(str(n) for n in results["units_per_variant"]))
    cols[1].metric("Needed per variant", results["required_units_per_variant"])
    cols[2].metric("SRM p-value", f"{results['srm_p_value']:.3g}")
    history = ui.state(api).setdefault(f"seq:{key}", [])
    for metric in results["metrics"]:
        _metric(metric, variants, history)
    if history:
        st.caption("Sequential (always-valid) p-value, as read by this console session")
        frame = pd.DataFrame(history, columns=["time", "comparison", "p"])
        st.line_chart(frame, x="time", y="p", color="comparison")
    for note in results.get("notes", []):
        st.caption(note)


def _metric(metric: dict, variants: list[str], history: list) -> None:
    name = metric["metric"]["name"]
    role = "guardrail" if metric["guardrail"] else "primary"
    st.markdown(
        f"**{name}** ({role}; per {metric['analysis_unit'] or 'unit'}, from {metric['source']})"
    )
    comparisons = metric["comparisons"]
    if not comparisons:
        st.caption("No data yet.")
        return
    frame = pd.DataFrame(
        {
            "variant": c["variant"],
            "lift": c["relative_lift"],
            "ci low": c["relative_lift_ci_low"],
            "ci high": c["relative_lift_ci_high"],
            "p": c["p_value"],
            "p (Holm)": c["adjusted_p_value"],
            "p (sequential)": c["sequential_p_value"],
            "P(beats control)": c["chance_to_beat_control"],
            "significant": c["significant"],
        }
        for c in comparisons
    )
    st.dataframe(frame, hide_index=True)
    finite = frame[[math.isfinite(x) for x in frame["ci low"]]]
    if not finite.empty:  # lift with its confidence interval, 0 marked
        base = alt.Chart(finite).encode(y=alt.Y("variant:N", sort=variants))
        bars = base.mark_rule(strokeWidth=3).encode(
            x=alt.X("ci low:Q", title=f"relative lift of {name}", axis=alt.Axis(format="%")),
            x2="ci high:Q",
        )
        dots = base.mark_point(filled=True, size=80).encode(x="lift:Q")
        zero = alt.Chart(pd.DataFrame({"x": [0]})).mark_rule(strokeDash=[4, 4]).encode(x="x:Q")
        st.altair_chart(bars + dots + zero, use_container_width=True)
    now = pd.Timestamp(time.time(), unit="s")
    history.extend((now, f"{name}: {c['variant']}", c["sequential_p_value"]) for c in comparisons)


def required_units(
    baseline: float, mde: float, alpha: float, power: float, stddev: float | None = None
) -> int:
    """Units per variant for a two-sided test to detect a relative lift `mde` (the
    experiments service's formula): rates when stddev is None, else means."""
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    if stddev is None:
        p1, p2 = baseline, min(max(baseline * (1 + mde), 0.0), 1.0)
        delta, spread = abs(p2 - p1), p1 * (1 - p1) + p2 * (1 - p2)
    else:
        delta, spread = abs(mde * baseline), 2 * stddev**2
    return 0 if delta == 0 else math.ceil(z * z * spread / (delta * delta))


def _calculator() -> None:
    cols = st.columns(5)
    kind = cols[0].radio("Metric", ["rate", "mean"], key="calc_kind")
    baseline = cols[1].number_input("Baseline", 0.0, 1e9, 0.5, key="calc_baseline")
    mde = cols[2].number_input("Relative MDE", 0.001, 10.0, 0.05, 0.01, key="calc_mde")
    alpha = cols[3].number_input("Alpha", 0.001, 0.5, 0.05, 0.01, key="calc_alpha")
    power = cols[4].number_input("Power", 0.5, 0.999, 0.8, 0.05, key="calc_power")
    stddev = None
    if kind == "mean":
        stddev = st.number_input("Standard deviation", 0.0, 1e9, 1.0, key="calc_stddev")
    if kind == "rate" and not 0 < baseline < 1:
        st.error("A rate's baseline lies between 0 and 1.")
        return
    n = required_units(baseline, mde, alpha, power, stddev)
    st.metric("Units per variant", f"{n:,}")
