"""Prometheus series of the inference service, read from its state at scrape time.

A collector instead of counters sprinkled over the hot path: the cache tiers and the
scheduler already count what the dashboards need, so a scrape just reads them.
"""

from __future__ import annotations

import weakref

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.inference.core import InferenceCore


class InferenceCollector(Collector):
    """Series of the most recently created InferenceCore (one per process)."""

    def __init__(self) -> None:
        self._core: weakref.ref[InferenceCore] | None = None

    def track(self, core: InferenceCore) -> None:
        self._core = weakref.ref(core)

    def collect(self):
        core = self._core() if self._core else None
        if core is None:
            return
        yield from _cache_series(core)
        yield from _scheduler_series(core)
        swaps = CounterMetricFamily(
            "loraplex_inference_swap_events",
            "Hot-swap announcements this replica applied (pub/sub, from any replica).",
        )
        swaps.add_metric([], core.swap_listener.events_handled)
        yield swaps


def _cache_series(core: InferenceCore):
    def family(kind, name, doc):
        return kind(f"loraplex_adapter_cache_{name}", doc, labels=["tier"])

    hits = family(CounterMetricFamily, "hits", "Adapter cache lookups that found the adapter.")
    misses = family(CounterMetricFamily, "misses", "Adapter cache lookups that had to load it.")
    evictions = family(CounterMetricFamily, "evictions", "Adapters evicted to make room (LRU).")
    expirations = family(CounterMetricFamily, "expirations", "Adapters dropped by the TTL.")
    load = family(CounterMetricFamily, "load_seconds", "Time spent loading adapters into the tier.")
    used = family(GaugeMetricFamily, "used_bytes", "Bytes of adapters held in the tier.")
    capacity = family(GaugeMetricFamily, "capacity_bytes", "The tier's byte budget.")
    entries = family(GaugeMetricFamily, "entries", "Adapters held in the tier.")
    for snap in core.cache_stats():
        hits.add_metric([snap.tier], snap.hits)
        misses.add_metric([snap.tier], snap.misses)
        evictions.add_metric([snap.tier], snap.evictions)
        expirations.add_metric([snap.tier], snap.expirations)
        load.add_metric([snap.tier], snap.load_seconds_total)
        used.add_metric([snap.tier], snap.used_bytes)
        capacity.add_metric([snap.tier], snap.capacity_bytes)
        entries.add_metric([snap.tier], snap.entries)
    yield from (hits, misses, evictions, expirations, load, used, capacity, entries)


def _scheduler_series(core: InferenceCore):
    limits = core.settings.batching_limits()
    batch_limit = GaugeMetricFamily(
        "loraplex_inference_batch_size_limit", "max_batch_size: rows decoded together at most."
    )
    batch_limit.add_metric([], limits.max_batch_size)
    queue_limit = GaugeMetricFamily(
        "loraplex_inference_queue_limit", "max_queued_requests: beyond it, RESOURCE_EXHAUSTED."
    )
    queue_limit.add_metric([], limits.max_queued_requests)
    yield from (batch_limit, queue_limit)
    scheduler = core._scheduler  # None while the model loads: no batch series yet
    if scheduler is None:
        return
    stats = scheduler.stats()
    queued = GaugeMetricFamily("loraplex_inference_queued_requests", "Requests waiting for a row.")
    queued.add_metric([], stats["queued"])
    running = GaugeMetricFamily(
        "loraplex_inference_running_requests", "Rows in the running batch (batch occupancy)."
    )
    running.add_metric([], stats["running"])
    steps = CounterMetricFamily(
        "loraplex_inference_decode_steps", "Decode steps (one token for every running row)."
    )
    steps.add_metric([], stats["steps"])
    yield from (queued, running, steps)


COLLECTOR = InferenceCollector()
prometheus_client.REGISTRY.register(COLLECTOR)
