"""Analytics: one adapter's metrics over a window, their time series, the top performers by
any metric, and the adapter's versions side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from console import ui
from console.client import Gateway

RANK_METRICS = {
    "success_rate": "success rate",
    "p95_latency": "p95 latency",
    "requests": "requests",
    "avg_rating": "average rating",
    "tokens_per_second": "tokens / s",
}
# Columns of the version comparison and the time series: (field, heading).
COLUMNS = [
    ("requests", "requests"),
    ("success_rate", "success rate"),
    ("latency_p50_seconds", "p50 latency s"),
    ("latency_p95_seconds", "p95 latency s"),
    ("latency_p99_seconds", "p99 latency s"),
    ("time_to_first_token_mean_seconds", "TTFT mean s"),
    ("completion_tokens", "completion tokens"),
    ("tokens_per_second", "tokens / s"),
    ("rating_count", "ratings"),
    ("rating_mean", "mean rating"),
]


def render(api: Gateway) -> None:
    adapters = ui.attempt(api.adapters)
    if adapters is None:
        return
    if not adapters:
        st.info("This tenant has no adapters yet.")
        return
    versions = {a["name"]: a["version"] for a in adapters}
    left, right = st.columns([3, 1])
    adapter = left.selectbox("Adapter", list(versions), key="analytics_adapter")
    window = right.selectbox("Window", ui.WINDOWS, index=1, key="analytics_window")
    reply = ui.attempt(api.adapter_metrics, adapter, window)
    if reply is not None:
        _summary(reply["metrics"])
    series = ui.attempt(api.timeseries, adapter, window)
    if series is not None:
        _charts(series["points"])
    _top_performers(api, window)
    _versions(api, adapter, versions[adapter], window)


def _summary(m: dict) -> None:
    st.subheader("Requests")
    cols = st.columns(5)
    cols[0].metric("Requests", f"{m['requests']:,}")
    cols[1].metric("Success rate", ui.percent(m["success_rate"] if m["requests"] else None))
    cols[2].metric("Errors", f"{m['errors']:,}")
    cols[3].metric("Tokens / s", f"{m['tokens_per_second']:.1f}")
    tokens = m["prompt_tokens"] + m["completion_tokens"]
    cols[4].metric("Tokens", f"{tokens:,}", help="prompt + completion")
    cols = st.columns(5)
    cols[0].metric("Latency p50", ui.seconds(m["latency_p50_seconds"]))
    cols[1].metric("Latency p95", ui.seconds(m["latency_p95_seconds"]))
    cols[2].metric("Latency p99", ui.seconds(m["latency_p99_seconds"]))
    cols[3].metric("TTFT mean", ui.seconds(m["time_to_first_token_mean_seconds"]))
    rating = f"{m['rating_mean']:.2f} ({m['rating_count']})" if m["rating_count"] else "-"
    cols[4].metric("Rating (count)", rating)
    if m["errors_by_code"]:
        st.caption(
            "Errors by code: " + ", ".join(f"{k} {v}" for k, v in m["errors_by_code"].items())
        )


def _charts(points: list[dict]) -> None:
    if not points:
        return
    frame = pd.DataFrame(
        {heading: [p["metrics"][field] for p in points] for field, heading in COLUMNS},
        index=pd.to_datetime([p["start_time"] for p in points]),
    )
    # An empty bucket has no latency (not a latency of 0): leave a gap in the chart.
    idle = frame["requests"] == 0
    for _, heading in COLUMNS[1:6]:
        frame.loc[idle, heading] = None
    left, right = st.columns(2)
    left.caption("Requests and errors per bucket")
    frame["errors"] = [p["metrics"]["errors"] for p in points]
    left.line_chart(frame[["requests", "errors"]])
    right.caption("Latency quantiles (s)")
    right.line_chart(frame[["p50 latency s", "p95 latency s", "p99 latency s"]])


def _top_performers(api: Gateway, window: str) -> None:
    st.subheader("Top performers")
    metric = st.selectbox(
        "Rank by", list(RANK_METRICS), format_func=RANK_METRICS.get, key="analytics_rank"
    )
    reply = ui.attempt(api.top_performers, metric, window)
    if reply is None:
        return
    rows = reply.get("adapters", [])
    if not rows:
        st.caption("No adapter served a request in this window.")
        return
    st.dataframe(
        pd.DataFrame(
            [(r["adapter"], r["value"], r["requests"]) for r in rows],
            columns=["adapter", RANK_METRICS[metric], "requests"],
        ),
        hide_index=True,
    )


def _versions(api: Gateway, adapter: str, serving: int, window: str) -> None:
    st.subheader("Versions")
    if serving < 2:
        st.caption(f"{adapter} has one version: nothing to compare yet.")
        return
    # Versions are numbered from 1; the serving one is usually the newest.
    chosen = st.multiselect(
        "Compare versions",
        list(range(1, serving + 1)),
        default=[serving - 1, serving],
        key="analytics_versions",
    )
    rows = {}
    for version in chosen:
        reply = ui.attempt(api.adapter_metrics, adapter, window, version)
        if reply is not None:
            rows[f"v{version}"] = {h: reply["metrics"][f] for f, h in COLUMNS}
    if rows:
        st.dataframe(pd.DataFrame(rows).T)
