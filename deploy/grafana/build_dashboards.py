# ruff: noqa: E501  (PromQL reads better unbroken)
"""Writes the Grafana dashboards (deploy/grafana/dashboards/*.json) from the short panel
lists below: `python deploy/grafana/build_dashboards.py` (tests/deploy fails when the
committed JSON is stale, and when a query names a metric the running stack lacks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}

# (title, unit, [(legend, PromQL)], width) per panel; rows of 24 grid units.
RATE = "[$__rate_interval]"
TENANT = '{tenant=~"$tenant", adapter=~"$adapter"}'


def q(legend: str, expr: str) -> tuple[str, str]:
    return legend, expr


DASHBOARDS = {
    "loraplex-overview": (
        "loraplex: platform overview",
        [
            (
                "Completions/s by tenant and adapter",
                "reqps",
                [
                    q(
                        "{{tenant}} / {{adapter}}",
                        f"sum by (tenant, adapter) (rate(loraplex_adapter_requests_total{TENANT}{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Error ratio by tenant and adapter",
                "percentunit",
                [
                    q(
                        "{{tenant}} / {{adapter}}",
                        "sum by (tenant, adapter) (rate(loraplex_adapter_requests_total"
                        f'{{tenant=~"$tenant", adapter=~"$adapter", code!="OK"}}{RATE}))'
                        " / sum by (tenant, adapter) (rate(loraplex_adapter_requests_total"
                        f"{TENANT}{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Completion latency p50 / p95 / p99",
                "s",
                [
                    q(
                        f"p{p} {{{{tenant}}}} / {{{{adapter}}}}",
                        f"histogram_quantile(0.{p}, sum by (le, tenant, adapter) "
                        f"(rate(loraplex_adapter_request_duration_seconds_bucket{TENANT}{RATE})))",
                    )
                    for p in (50, 95, 99)
                ],
                12,
            ),
            (
                "Tokens/s",
                "short",
                [
                    q(
                        "{{kind}} {{tenant}} / {{adapter}}",
                        f"sum by (kind, tenant, adapter) (rate(loraplex_adapter_tokens_total{TENANT}{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Batch occupancy (running rows / max_batch_size)",
                "percentunit",
                [
                    q(
                        "{{instance}}",
                        "loraplex_inference_running_requests / loraplex_inference_batch_size_limit",
                    ),
                ],
                8,
            ),
            (
                "Queue depth (requests waiting for a row)",
                "short",
                [
                    q("{{instance}}", "loraplex_inference_queued_requests"),
                    q("limit {{instance}}", "loraplex_inference_queue_limit"),
                ],
                8,
            ),
            (
                "HTTP 429s/s (queue full, tenant queue full)",
                "reqps",
                [
                    q(
                        "{{route}}",
                        f'sum by (route) (rate(loraplex_http_requests_total{{status="429"}}{RATE}))',
                    ),
                ],
                8,
            ),
            (
                "HTTP requests/s by status",
                "reqps",
                [
                    q("{{status}}", f"sum by (status) (rate(loraplex_http_requests_total{RATE}))"),
                ],
                12,
            ),
            (
                "gRPC errors/s by service and code",
                "reqps",
                [
                    q(
                        "{{grpc_service}} {{grpc_code}}",
                        "sum by (grpc_service, grpc_code) (rate(loraplex_grpc_server_handled_total"
                        f'{{grpc_code!="OK"}}{RATE}))',
                    ),
                ],
                12,
            ),
        ],
    ),
    "loraplex-adapter-cache": (
        "loraplex: adapter cache",
        [
            (
                "Hit ratio by tier",
                "percentunit",
                [
                    q(
                        "{{tier}}",
                        f"sum by (tier) (rate(loraplex_adapter_cache_hits_total{RATE})) / "
                        f"(sum by (tier) (rate(loraplex_adapter_cache_hits_total{RATE})) + "
                        f"sum by (tier) (rate(loraplex_adapter_cache_misses_total{RATE})))",
                    ),
                ],
                8,
            ),
            (
                "Misses/s and evictions/s by tier",
                "ops",
                [
                    q(
                        "misses {{tier}}",
                        f"sum by (tier) (rate(loraplex_adapter_cache_misses_total{RATE}))",
                    ),
                    q(
                        "evictions {{tier}}",
                        f"sum by (tier) (rate(loraplex_adapter_cache_evictions_total{RATE}))",
                    ),
                    q(
                        "expirations {{tier}}",
                        f"sum by (tier) (rate(loraplex_adapter_cache_expirations_total{RATE}))",
                    ),
                ],
                8,
            ),
            (
                "Mean load time by tier",
                "s",
                [
                    q(
                        "{{tier}}",
                        f"sum by (tier) (rate(loraplex_adapter_cache_load_seconds_total{RATE})) / "
                        f"sum by (tier) (rate(loraplex_adapter_cache_misses_total{RATE}))",
                    ),
                ],
                8,
            ),
            (
                "Bytes used / budget by tier",
                "bytes",
                [
                    q("used {{tier}} {{instance}}", "loraplex_adapter_cache_used_bytes"),
                    q("budget {{tier}} {{instance}}", "loraplex_adapter_cache_capacity_bytes"),
                ],
                12,
            ),
            (
                "Adapters held by tier",
                "short",
                [
                    q("{{tier}} {{instance}}", "loraplex_adapter_cache_entries"),
                ],
                12,
            ),
        ],
    ),
    "loraplex-hot-swap": (
        "loraplex: hot-swaps",
        [
            (
                "Swaps and rollbacks/s by outcome",
                "ops",
                [
                    q(
                        "{{grpc_method}} {{grpc_code}}",
                        "sum by (grpc_method, grpc_code) (rate(loraplex_grpc_server_handled_total"
                        f'{{grpc_method=~"SwapAdapter|RollbackAdapter"}}{RATE}))',
                    ),
                ],
                12,
            ),
            (
                "Swap announcements applied per replica",
                "short",
                [
                    q("{{instance}}", f"increase(loraplex_inference_swap_events_total{RATE})"),
                ],
                12,
            ),
            (
                "Swap latency p95",
                "s",
                [
                    q(
                        "{{grpc_method}}",
                        "histogram_quantile(0.95, sum by (le, grpc_method) "
                        "(rate(loraplex_grpc_server_handling_seconds_bucket"
                        f'{{grpc_method=~"SwapAdapter|RollbackAdapter"}}{RATE})))',
                    ),
                ],
                24,
            ),
        ],
    ),
    "loraplex-analytics": (
        "loraplex: analytics ingest",
        [
            (
                "Events/s accepted and rejected",
                "ops",
                [
                    q("accepted", f"sum(rate(loraplex_analytics_events_accepted_total{RATE}))"),
                    q(
                        "rejected {{reason}}",
                        f"sum by (reason) (rate(loraplex_analytics_events_rejected_total{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Gateway export: sent / rejected / dropped per s",
                "ops",
                [
                    q(
                        "{{outcome}}",
                        f'sum by (outcome) (rate(loraplex_batch_export_items_total{{exporter="analytics-events"}}{RATE}))',
                    ),
                ],
                12,
            ),
            (
                "Ingest lag p50 / p95 (age of a batch's oldest event)",
                "s",
                [
                    q(
                        f"p{p}",
                        f"histogram_quantile(0.{p}, sum by (le) "
                        f"(rate(loraplex_analytics_ingest_lag_seconds_bucket{RATE})))",
                    )
                    for p in (50, 95)
                ],
                12,
            ),
            (
                "Exporter queues (items waiting)",
                "short",
                [
                    q("{{exporter}} {{instance}}", "loraplex_batch_export_queued_items"),
                ],
                12,
            ),
            (
                "Duplicate batches/s (client retries)",
                "ops",
                [
                    q("duplicates", f"sum(rate(loraplex_analytics_duplicate_batches_total{RATE}))"),
                ],
                24,
            ),
        ],
    ),
    "loraplex-experiments": (
        "loraplex: experiments",
        [
            (
                "Completions/s per variant",
                "reqps",
                [
                    q(
                        "{{experiment}} / {{variant}}",
                        f"sum by (experiment, variant) (rate(loraplex_experiment_requests_total{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Share of traffic per variant",
                "percentunit",
                [
                    q(
                        "{{experiment}} / {{variant}}",
                        f"sum by (experiment, variant) (rate(loraplex_experiment_requests_total{RATE}))"
                        " / ignoring(variant) group_left sum by (experiment) "
                        f"(rate(loraplex_experiment_requests_total{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Sample-ratio mismatch (1 = flagged at the last GetResults)",
                "short",
                [
                    q(
                        "{{tenant}} / {{experiment}}",
                        "max by (tenant, experiment) (loraplex_experiment_srm_detected)",
                    ),
                ],
                24,
            ),
        ],
    ),
    "loraplex-feedback": (
        "loraplex: feedback loop",
        [
            (
                "Feedback queue depth",
                "short",
                [
                    q("{{state}}", "sum by (state) (loraplex_activelearning_queue_items)"),
                ],
                12,
            ),
            (
                "Reviews/s by kind",
                "ops",
                [
                    q(
                        "{{kind}}",
                        f"sum by (kind) (rate(loraplex_activelearning_feedback_total{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Candidates/s by outcome",
                "ops",
                [
                    q(
                        "{{outcome}}",
                        f"sum by (outcome) (rate(loraplex_activelearning_candidates_total{RATE}))",
                    ),
                ],
                12,
            ),
            (
                "Candidate embeddings by source",
                "ops",
                [
                    q(
                        "{{source}}",
                        f"sum by (source) (rate(loraplex_activelearning_embeddings_total{RATE}))",
                    ),
                ],
                12,
            ),
        ],
    ),
    # Training jobs: add a dashboard here once services/training exports its metrics
    # (jobs by state, job duration, federation rounds).
}


def variables(name: str) -> list[dict]:
    out = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}
    ]
    if name == "loraplex-overview":
        for var, expr in (
            ("tenant", "loraplex_adapter_requests_total"),
            ("adapter", 'loraplex_adapter_requests_total{tenant=~"$tenant"}'),
        ):
            out.append({
                "name": var, "type": "query", "datasource": DS, "includeAll": True,
                "multi": True, "allValue": ".*", "refresh": 2,
                "query": {"query": f"label_values({expr}, {var})", "refId": var},
                "current": {"text": "All", "value": "$__all"},
            })  # fmt: skip
    return out


def dashboard(uid: str, title: str, panels: list) -> dict:
    out, x, y, height = [], 0, 0, 8
    for i, (ptitle, unit, queries, width) in enumerate(panels, start=1):
        if x + width > 24:
            x, y = 0, y + height
        out.append({
            "id": i, "type": "timeseries", "title": ptitle, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": width, "h": height},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [
                {"refId": chr(65 + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                for j, (legend, expr) in enumerate(queries)
            ],
        })  # fmt: skip
        x += width
    return {
        "uid": uid, "title": title, "tags": ["loraplex"], "schemaVersion": 39,
        "editable": True, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables(uid)}, "panels": out,
    }  # fmt: skip


def render() -> dict[str, str]:
    return {
        f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("*.json"):
        stale.unlink()
    for name, text in render().items():
        (OUT / name).write_text(text)
    print(f"wrote {len(DASHBOARDS)} dashboards to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
