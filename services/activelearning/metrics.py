"""Feedback queue depth for Prometheus, counted in Redis at scrape time.

The queue lives in Redis (one sorted set per tenant), so no process holds its size; a scrape
reads it for every tenant the gateway created, on the service's own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.activelearning.queue import FeedbackQueue
from services.common.keys import tenants_index

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT_SECONDS = 2.0


class QueueDepthCollector(Collector):
    def __init__(self) -> None:
        self._queue: FeedbackQueue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def track(self, queue: FeedbackQueue, loop: asyncio.AbstractEventLoop) -> None:
        self._queue, self._loop = queue, loop

    async def _depths(self) -> tuple[int, int]:
        queue = self._queue
        assert queue is not None
        tenants = [t.decode() for t in await queue.redis.hkeys(tenants_index())]
        async with queue.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zcard(queue.k(tenant, "queue"))
                pipe.zcard(queue.k(tenant, "leases"))
            counts = await pipe.execute()
        return sum(counts[0::2]), sum(counts[1::2])

    def collect(self):
        loop = self._loop
        if self._queue is None or loop is None or loop.is_closed():
            return
        if getattr(loop, "_thread_id", None) == threading.get_ident():
            return  # scraped from the loop's own thread: waiting on it would deadlock
        try:
            queued, leased = asyncio.run_coroutine_threadsafe(self._depths(), loop).result(
                SCRAPE_TIMEOUT_SECONDS
            )
        except Exception as err:  # Redis away: no series this scrape, the reason logged
            log.warning("feedback queue depth unavailable", extra={"error": repr(err)})
            return
        depth = GaugeMetricFamily(
            "loraplex_activelearning_queue_items",
            "Feedback queue items over all tenants: queued (waiting for a reviewer) and "
            "leased (handed to a reviewer, not answered yet).",
            labels=["state"],
        )
        depth.add_metric(["queued"], queued)
        depth.add_metric(["leased"], leased)
        yield depth


COLLECTOR = QueueDepthCollector()
prometheus_client.REGISTRY.register(COLLECTOR)
