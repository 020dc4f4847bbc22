"""The library API: `from services import AdapterAnalytics, get_analytics`.

An in-process facade over the analytics domain layer (no gRPC, no server): record events
and query the same aggregates the analytics service serves, straight from Redis.

    analytics = get_analytics("redis://localhost:6379/0")
    await analytics.record("batch-1", [Event(tenant="acme", adapter="support", ...)])
    metrics = await analytics.adapter_metrics("acme", "support", window_seconds=3600)
    await analytics.close()

The product spec's synchronous calls are thin facades over the same methods, usable from
plain code and from inside `async def` alike:

    analytics = get_analytics(redis_url, tenant="retailer")  # the tenant of tenant-less calls
    analytics.record_request("support", "retailer", 182.0, success=True)
    for adapter in analytics.get_top_adapters(metric="success_rate", limit=5):
        print(adapter.adapter_id, adapter.get_success_rate(), adapter.avg_latency_ms)
    analytics.get_adapter_metrics("support")
    analytics.close_sync()
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.analytics.core import (
    AnalyticsCore,
    Event,
    Metrics,
    Ranked,
    RecordResult,
    SeriesFilter,
)
from services.analytics.settings import AnalyticsSettings
from services.common.errors import InvalidArgument
from services.common.loops import LoopThread
from services.common.redis import EmbeddedRedis, connect

__all__ = [
    "AdapterAnalytics",
    "AdapterStats",
    "Event",
    "Metrics",
    "SeriesFilter",
    "get_analytics",
]


@dataclass(frozen=True)
class AdapterStats:
    """One adapter's metrics over a window, in the product spec's terms (plain numbers, so
    a web handler can return it as JSON)."""

    adapter_id: str
    tenant: str
    requests: int
    successes: int
    errors: int
    success_rate: float
    avg_latency_ms: float
    p50_latency_ms: float
    p95_latency_ms: float
    p99_latency_ms: float
    tokens_per_second: float
    rating_count: int
    avg_rating: float

    @classmethod
    def of(cls, tenant: str, adapter: str, m: Metrics) -> AdapterStats:
        p50, p95, p99 = (1000 * q for q in m.sketch.quantiles((0.5, 0.95, 0.99)))
        return cls(
            adapter,
            tenant,
            m.requests,
            m.successes,
            m.errors,
            m.success_rate,
            1000 * m.latency_mean,
            p50,
            p95,
            p99,
            m.tokens_per_second,
            m.rating_count,
            m.rating_mean,
        )

    def get_success_rate(self) -> float:
        """successes / requests; 0 without requests."""
        return self.success_rate


class AdapterAnalytics:
    """Per-adapter analytics over one Redis. The methods are coroutines, except the
    product spec's synchronous calls (record_request, get_adapter_metrics,
    get_top_adapters, close_sync). Both run in a loop of the object's own (see
    services.common.loops), so a Redis client passed in is used from there: give it one of
    its own."""

    def __init__(
        self,
        redis: aioredis.Redis | str | None = None,
        settings: AnalyticsSettings | None = None,
        *,
        tenant: str | None = None,
    ) -> None:
        """redis: a client, a URL, or None for an embedded redis-server of its own.
        tenant: the tenant of the synchronous queries that name none."""
        self._embedded = EmbeddedRedis() if redis is None else None
        if self._embedded is not None:
            redis = self._embedded.url
        self._owns_redis = isinstance(redis, str)
        self.redis = connect(redis) if isinstance(redis, str) else redis
        self.settings = settings or AnalyticsSettings()
        self.core = AnalyticsCore(self.settings, self.redis)
        self.tenant = tenant
        self._loop = LoopThread("analytics-library")

    async def record(self, batch_id: str, events: Sequence[Event]) -> RecordResult:
        """Count a batch of events once per batch_id; bad events are rejected one by one."""
        return await self._loop.run(self.core.record_batch(batch_id, events))

    async def adapter_metrics(
        self,
        tenant: str,
        adapter: str,
        window_seconds: float = 3600,
        end: float | None = None,
        series: SeriesFilter | None = None,
    ) -> Metrics:
        metrics, _ = await self._loop.run(
            self.core.adapter_metrics(tenant, adapter, window_seconds, end, series)
        )
        return metrics

    async def top_adapters(
        self,
        tenant: str,
        metric: str = "requests",
        limit: int = 10,
        window_seconds: float = 3600,
        min_requests: int = 0,
        end: float | None = None,
    ) -> list[Ranked]:
        ranked, _ = await self._loop.run(
            self.core.top_adapters(tenant, metric, limit, window_seconds, end, min_requests)
        )
        return ranked

    async def timeseries(
        self,
        tenant: str,
        adapter: str,
        window_seconds: float = 3600,
        end: float | None = None,
        resolution_seconds: int | None = None,
        series: SeriesFilter | None = None,
    ) -> list[tuple[int, Metrics]]:
        points, _ = await self._loop.run(
            self.core.timeseries(tenant, adapter, window_seconds, end, resolution_seconds, series)
        )
        return points

    # --- the product spec's synchronous calls ------------------------------------------

    def record_request(
        self,
        adapter_id: str,
        tenant: str,
        latency_ms: float,
        success: bool = True,
        *,
        error: str = "INTERNAL",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> RecordResult:
        """Count one request now, as a batch of its own (a retry of this call counts again;
        record() with a batch id is exactly once). error: its status when not a success
        (a RequestStatus name). A rejected event raises InvalidArgument with the reason."""
        event = Event(
            tenant,
            adapter_id,
            status="OK" if success else error,
            latency_seconds=latency_ms / 1000,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        result = self._loop.call(self.record(f"request-{uuid.uuid4().hex}", [event]))
        if result.rejected:
            reason = result.rejected[0][1]
            raise InvalidArgument(f"the request was not counted: {reason}", reason=reason)
        return result

    def get_adapter_metrics(
        self, adapter_id: str, *, tenant: str | None = None, window_seconds: float = 3600
    ) -> AdapterStats:
        """The adapter's metrics over the last window_seconds."""
        return self._loop.call(self._stats(self._tenant(tenant), adapter_id, window_seconds))

    def get_top_adapters(
        self,
        metric: str = "requests",
        limit: int = 10,
        *,
        tenant: str | None = None,
        window_seconds: float = 3600,
        min_requests: int = 0,
    ) -> list[AdapterStats]:
        """The tenant's best adapters by metric (success_rate, p95_latency, requests,
        avg_rating, tokens_per_second) over the last window_seconds, best first, each with
        its metrics over the same window."""
        tenant = self._tenant(tenant)

        async def top() -> list[AdapterStats]:
            ranked = await self.top_adapters(tenant, metric, limit, window_seconds, min_requests)
            return [await self._stats(tenant, r.adapter, window_seconds) for r in ranked]

        return self._loop.call(top())

    def close_sync(self) -> None:
        """close() for plain code."""
        if not self._loop.stopped:
            self._loop.call(self._close())
            self._stop()

    async def _stats(self, tenant: str, adapter: str, window_seconds: float) -> AdapterStats:
        return AdapterStats.of(
            tenant, adapter, await self.adapter_metrics(tenant, adapter, window_seconds)
        )

    def _tenant(self, tenant: str | None) -> str:
        tenant = tenant or self.tenant
        if not tenant:
            raise InvalidArgument(
                "name the tenant: tenant=..., or get_analytics(..., tenant=...)",
                reason="INVALID_TENANT",
            )
        return tenant

    # --- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        if not self._loop.stopped:
            await self._loop.run(self._close())
            self._stop()

    async def _close(self) -> None:
        if self._owns_redis:
            await self.redis.aclose()

    def _stop(self) -> None:
        self._loop.stop()
        if self._embedded is not None:
            self._embedded.close()

    async def __aenter__(self) -> AdapterAnalytics:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> AdapterAnalytics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()


def get_analytics(
    redis_url: str | None = None,
    settings: AnalyticsSettings | None = None,
    *,
    tenant: str | None = None,
) -> AdapterAnalytics:
    """An AdapterAnalytics on redis_url, else on the settings' REDIS_URL (config/analytics.yaml
    overridden by the environment), else on an embedded redis-server of its own (as every
    service does without REDIS_URL). tenant: the tenant of the synchronous queries that
    name none (the product spec's get_top_adapters and get_adapter_metrics)."""
    settings = settings or AnalyticsSettings()
    return AdapterAnalytics(redis_url or settings.redis_url, settings, tenant=tenant)
