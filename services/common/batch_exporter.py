"""BatchExporter: items sent off the request path, in batches, with retries.

record() only appends to a bounded in-memory queue and never blocks or raises; one
background task sends batches (flushed by size or interval) with the exporter's `send`,
retrying with backoff under the same batch id, so a receiver that de-duplicates by it
counts a retried batch once. A slow or dead receiver therefore never slows or fails the
request that produced an item: past the queue's bound, items are dropped and counted.
close() flushes what is queued, bounded in time.

With an outbox (services/common/outbox.py, a Redis stream) the queue is durable instead:
add() appends the item to the outbox before it returns, and a batch whose retries ran out
is not dropped but sent again, under the same batch id, at the next flush — so nothing is
lost to an outage of any length, or to the sender's crash. While Redis itself is
unreachable, add() keeps the item in the in-memory queue (bounded, drops counted) and the
next flush moves it into the outbox.

The exporters are three `send`s: analytics events (analytics_exporter.py; the gateway's go
through an outbox), the gateway's active-learning candidates and the feedback forwarder's
experiment outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import grpc
import prometheus_client
import redis.exceptions

from services.common.outbox import RedisOutbox

log = logging.getLogger(__name__)

ITEMS = prometheus_client.Counter(
    "loraplex_batch_export_items_total",
    "Items sent off the request path by exporter and outcome: sent, rejected (by the "
    "receiving service), dropped (queue or outbox full, refused as invalid, retries "
    "exhausted without an outbox, still in memory at shutdown).",
    ["exporter", "outcome"],
)
QUEUED = prometheus_client.Gauge(
    "loraplex_batch_export_queued_items",
    "Items waiting in an exporter's in-memory queue (analytics events, candidates, ...).",
    ["exporter"],
)
EXHAUSTED = prometheus_client.Counter(
    "loraplex_batch_export_exhausted_total",
    "Batches whose send retries ran out (the receiver was down longer than the retry "
    "budget): dropped without an outbox, kept and sent again with one.",
    ["exporter"],
)
OUTBOX_ITEMS = prometheus_client.Gauge(
    "loraplex_outbox_items",
    "Items waiting to be sent, by exporter: in the outbox, or in memory while Redis is "
    "unreachable (refreshed at each flush).",
    ["exporter"],
)
OUTBOX_LAG = prometheus_client.Gauge(
    "loraplex_outbox_lag_seconds",
    "Age of the oldest item in the outbox, by exporter (refreshed at each flush).",
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
        outbox: RedisOutbox[T] | None = None,
    ) -> None:
        self.name = name
        self._outbox = outbox
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
        self._added = 0  # to the outbox since the last flush
        self.dropped = 0
        # Batches whose retries ran out: dropped, or with an outbox kept and sent again.
        self.exhausted = 0
        self._outbox_failures = 0

    def record(self, item: T) -> None:
        """Never blocks and never raises: the request the item describes is already done."""
        if len(self._queue) >= self._max_queue:
            self._drop(1, "queue full")
            return
        self._queue.append(item)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def add(self, item: T) -> None:
        """record(), durable: the item is in the outbox when this returns, or in memory
        while Redis is unreachable. Never raises. Without an outbox: record()."""
        if self._outbox is None or self._queue:  # Redis was down: wait behind those
            self.record(item)
            return
        try:
            added = await self._outbox.add([item])
        except redis.exceptions.RedisError:
            self.record(item)  # the next flush moves it into the outbox
            return
        if not added:
            self._drop(1, "outbox full")
            return
        self._added += 1
        if self._added >= self._max_batch:
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
        except TimeoutError:  # what the outbox holds is kept: sent after the next start
            self._drop(0 if self._outbox else self._in_flight, "shutdown timeout")
        # Still in memory: with an outbox, Redis was unreachable to the end.
        self._drop(len(self._queue), "shutdown")

    async def flush(self) -> None:
        if self._outbox is not None:
            await self._flush_outbox(self._outbox)
            return
        while self._queue:
            count = min(self._max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self._in_flight = count
            if not await self._send(batch, f"{self.name}-{uuid.uuid4().hex}"):
                self._exhausted()
                self._drop(count, "retries exhausted")
            self._in_flight = 0

    async def _flush_outbox(self, outbox: RedisOutbox[T]) -> None:
        self._added = 0
        try:
            while self._queue:  # what add() kept in memory while Redis was down
                items = list(itertools.islice(self._queue, self._max_batch))
                added = await outbox.add(items)
                for _ in items:
                    self._queue.popleft()
                self._drop(len(items) - added, "outbox full")
            while (batch := await outbox.take(self._max_batch)) is not None:
                if not await self._send(batch.items, batch.batch_id):
                    self._exhausted()  # kept: sent again, same id, at the next flush
                    return
                await outbox.ack(batch)
        except redis.exceptions.RedisError as err:
            # Retried at the next flush; one warning per outage, not one per second.
            if not self._outbox_failures:
                log.warning(
                    "outbox unreachable; retrying",
                    extra={"exporter": self.name, "error": type(err).__name__},
                )
            self._outbox_failures += 1
            return
        finally:
            await self._observe(outbox)
        self._outbox_failures = 0

    async def _observe(self, outbox: RedisOutbox[T]) -> None:
        with contextlib.suppress(redis.exceptions.RedisError):
            length, age = await outbox.backlog()
            OUTBOX_ITEMS.labels(self.name).set(length + len(self._queue))
            OUTBOX_LAG.labels(self.name).set(age)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.flush()
            if self._closing:  # checked after a flush: close() wants the queue drained
                return

    async def _send(self, items: list[T], batch_id: str) -> bool:
        """True once the receiver took the batch (or refused it for good, counted as
        dropped); False when the retries ran out."""
        delay = 0.1
        for attempt in range(1, self._max_attempts + 1):
            try:
                accepted, rejected = await self._send_batch(items, batch_id)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self._drop(len(items), f"send failed: {err.code().name}")
                    return True
                if attempt == self._max_attempts:
                    return False
                await asyncio.sleep(delay)  # same batch id: a retry is never double counted
                delay = min(delay * 2, 5.0)
                continue
            ITEMS.labels(self.name, "sent").inc(accepted)
            ITEMS.labels(self.name, "rejected").inc(rejected)
            return True
        return False

    def _exhausted(self) -> None:
        self.exhausted += 1
        EXHAUSTED.labels(self.name).inc()

    def _drop(self, count: int, why: str) -> None:
        if count:
            self.dropped += count
            ITEMS.labels(self.name, "dropped").inc(count)
            log.warning(
                "exported items dropped",
                extra={"exporter": self.name, "count": count, "reason": why},
            )
