"""Per-adapter Prometheus series for a bounded set of adapters.

The first `limit` (tenant, adapter) pairs that served a request get series of their own;
every later pair is counted under tenant="_other", adapter="_other", so a tenant with
10,000 adapters cannot blow up the metrics' cardinality. A failure is counted under its
adapter only if that adapter has served before: the names a client sends are never label
values until they prove to be real adapters. Full per-adapter numbers live in analytics.
"""

from __future__ import annotations

import threading

import prometheus_client

OTHER = "_other"

REQUESTS = prometheus_client.Counter(
    "loraplex_adapter_requests_total",
    "Completions by adapter (a bounded set; the rest under _other) and gRPC status code.",
    ["tenant", "adapter", "code"],
)
DURATION = prometheus_client.Histogram(
    "loraplex_adapter_request_duration_seconds",
    "Completion latency at the gateway by adapter (a bounded set; the rest under _other).",
    ["tenant", "adapter"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = prometheus_client.Counter(
    "loraplex_adapter_tokens_total",
    "Tokens of answered completions by adapter (a bounded set; the rest under _other) and "
    "kind (prompt, completion).",
    ["tenant", "adapter", "kind"],
)
# Experiments and variants are few and created by admins: no cardinality bound needed.
EXPERIMENT_REQUESTS = prometheus_client.Counter(
    "loraplex_experiment_requests_total",
    "Completions routed through an experiment, by experiment key and assigned variant.",
    ["experiment", "variant"],
)


class AdapterSeries:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._tracked: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _labels(self, tenant: str, adapter: str, served: bool) -> tuple[str, str]:
        pair = (tenant, adapter)
        with self._lock:
            if pair in self._tracked:
                return pair
            if served and len(self._tracked) < self._limit:
                self._tracked.add(pair)
                return pair
        return OTHER, OTHER

    def observe(
        self,
        tenant: str,
        adapter: str,
        code: str,
        seconds: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        served: bool = True,
    ) -> None:
        """`served`: the adapter answered this request (so it exists)."""
        tenant, adapter = self._labels(tenant, adapter, served)
        REQUESTS.labels(tenant, adapter, code).inc()
        DURATION.labels(tenant, adapter).observe(seconds)
        if prompt_tokens or completion_tokens:
            TOKENS.labels(tenant, adapter, "prompt").inc(prompt_tokens)
            TOKENS.labels(tenant, adapter, "completion").inc(completion_tokens)
