"""BatchExporter: items sent off the request path, in batches, with retries.

record() only appends to a bounded in-memory queue and never blocks or raises; one
background task sends batches (flushed by size or interval) with the exporter's `send`,
retrying with backoff under the same batch id, so a receiver that de-duplicates by it
counts a retried batch once. A slow or dead receiver therefore never slows or fails the
request that produced an item: past the queue's bound, items are dropped and counted.
close() flushes what is queued, bounded in time.

The exporters are three `send`s: analytics events (analytics_exporter.py), the gateway's
active-learning candidates and the feedback forwarder's experiment outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import grpc
import prometheus_client

log = logging.getLogger(__name__)

ITEMS = prometheus_client.Counter(
    "loraplex_batch_export_items_total",
    "Items sent off the request path by exporter and outcome: sent, rejected (by the "
    "receiving service), dropped (queue full or retries exhausted).",
    ["exporter", "outcome"],
)
QUEUED = prometheus_client.Gauge(
    "loraplex_batch_export_queued_items",
    "Items waiting in an exporter's in-memory queue (analytics events, candidates, ...).",
    ["exporter"],
)

T = TypeVar("T")
# send(items, batch_id) -> (accepted, rejected) counts. batch_id is the same on every retry
# of one batch. Raising grpc.aio.AioRpcError retries the batch, except INVALID_ARGUMENT.
Send = Callable[[list[T], str], Awaitable[tuple[int, int]]]


class BatchExporter(Generic[T]):
    def __init__(
        self,
        send: Send[T],
        *,
        name: str,
        max_batch: int = 500,
        flush_interval_seconds: float = 1.0,
        max_queue: int = 100_000,
        max_attempts: int = 6,
    ) -> None:
        self.name = name
        self._send_batch = send
        self._queue: deque[T] = deque()
        self._max_batch = max_batch
        self._interval = flush_interval_seconds
        self._max_queue = max_queue
        self._max_attempts = max_attempts
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._in_flight = 0
        self.dropped = 0

    def record(self, item: T) -> None:
        """Never blocks and never raises: the request the item describes is already done."""
        if len(self._queue) >= self._max_queue:
            self._drop(1, "queue full")
            return
        self._queue.append(item)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    def start(self) -> None:
        QUEUED.labels(self.name).set_function(lambda: len(self._queue))
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-exporter")

    async def close(self, timeout_seconds: float = 5.0) -> None:
        """Flush what is queued, then stop; bounded in time (what is left is counted)."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, timeout_seconds)
        except TimeoutError:
            self._drop(len(self._queue) + self._in_flight, "shutdown timeout")

    async def flush(self) -> None:
        while self._queue:
            count = min(self._max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self._in_flight = count
            await self._send(batch)
            self._in_flight = 0

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.flush()
            if self._closing:  # checked after a flush: close() wants the queue drained
                return

    async def _send(self, items: list[T]) -> None:
        batch_id = f"{self.name}-{uuid.uuid4().hex}"
        delay = 0.1
        for attempt in range(1, self._max_attempts + 1):
            try:
                accepted, rejected = await self._send_batch(items, batch_id)
            except grpc.aio.AioRpcError as err:
                final = err.code() == grpc.StatusCode.INVALID_ARGUMENT
                if final or attempt == self._max_attempts:
                    self._drop(len(items), f"send failed: {err.code().name}")
                    return
                await asyncio.sleep(delay)  # same batch id: a retry is never double counted
                delay = min(delay * 2, 5.0)
                continue
            ITEMS.labels(self.name, "sent").inc(accepted)
            ITEMS.labels(self.name, "rejected").inc(rejected)
            return

    def _drop(self, count: int, why: str) -> None:
        if count:
            self.dropped += count
            ITEMS.labels(self.name, "dropped").inc(count)
            log.warning(
                "exported items dropped",
                extra={"exporter": self.name, "count": count, "reason": why},
            )
