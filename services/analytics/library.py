"""The library API: `from services import AdapterAnalytics, get_analytics`.

An in-process facade over the analytics domain layer (no gRPC, no server): record events
and query the same aggregates the analytics service serves, straight from Redis.

    analytics = get_analytics("redis://localhost:6379/0")
    await analytics.record("batch-1", [Event(tenant="acme", adapter="support", ...)])
    metrics = await analytics.adapter_metrics("acme", "support", window_seconds=3600)
    await analytics.close()
"""

from __future__ import annotations

from collections.abc import Sequence

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
from services.common.redis import EmbeddedRedis, connect

__all__ = ["AdapterAnalytics", "Event", "Metrics", "SeriesFilter", "get_analytics"]


class AdapterAnalytics:
    """Per-adapter analytics over one Redis; all methods are coroutines."""

    def __init__(
        self,
        redis: aioredis.Redis | str | None = None,
        settings: AnalyticsSettings | None = None,
    ) -> None:
        """redis: a client, a URL, or None for an embedded redis-server of its own."""
        self._embedded = EmbeddedRedis() if redis is None else None
        if self._embedded is not None:
            redis = self._embedded.url
        self._owns_redis = isinstance(redis, str)
        self.redis = connect(redis) if isinstance(redis, str) else redis
        self.settings = settings or AnalyticsSettings()
        self.core = AnalyticsCore(self.settings, self.redis)

    async def record(self, batch_id: str, events: Sequence[Event]) -> RecordResult:
        """Count a batch of events once per batch_id; bad events are rejected one by one."""
        return await self.core.record_batch(batch_id, events)

    async def adapter_metrics(
        self,
        tenant: str,
        adapter: str,
        window_seconds: float = 3600,
        end: float | None = None,
        series: SeriesFilter | None = None,
    ) -> Metrics:
        metrics, _ = await self.core.adapter_metrics(tenant, adapter, window_seconds, end, series)
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
        ranked, _ = await self.core.top_adapters(
            tenant, metric, limit, window_seconds, end, min_requests
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
        points, _ = await self.core.timeseries(
            tenant, adapter, window_seconds, end, resolution_seconds, series
        )
        return points

    async def close(self) -> None:
        if self._owns_redis:
            await self.redis.aclose()
        if self._embedded is not None:
            self._embedded.close()

    async def __aenter__(self) -> AdapterAnalytics:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def get_analytics(
    redis_url: str | None = None, settings: AnalyticsSettings | None = None
) -> AdapterAnalytics:
    """An AdapterAnalytics on redis_url, else on the settings' REDIS_URL (config/analytics.yaml
    overridden by the environment), else on an embedded redis-server of its own (as every
    service does without REDIS_URL)."""
    settings = settings or AnalyticsSettings()
    return AdapterAnalytics(redis_url or settings.redis_url, settings)
