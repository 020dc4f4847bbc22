"""Batch senders off the request path: analytics events, and any other RPC batch.

AnalyticsExporter hands one analytics event per completion to the analytics service.

record() only appends to a bounded in-memory queue; one background task sends batches
(flushed by size or interval) with RecordBatch, retrying with backoff under the same batch
id, which the analytics service counts once. A slow or dead analytics service therefore
never slows or fails a completion: past the queue's bound, events are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import prometheus_client

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb

log = logging.getLogger(__name__)

EVENTS = prometheus_client.Counter(
    "loraplex_gateway_analytics_events_total",
    "Analytics events by outcome: sent (accepted), rejected (by the service), dropped "
    "(queue full or retries exhausted).",
    ["outcome"],
)
QUEUED = prometheus_client.Gauge(
    "loraplex_batch_export_queued_items",
    "Items waiting in an exporter's in-memory queue (analytics events, candidates, ...).",
    ["exporter"],
)


def completion_event(
    tenant: str,
    adapter: common_pb2.AdapterRef,
    latency_seconds: float,
    code: grpc.StatusCode = grpc.StatusCode.OK,
    reply: ipb.GenerateResponse | None = None,
) -> apb.Event:
    """One completion's outcome; token counts and time to first token come from the reply."""
    outcome = apb.RequestOutcome(
        # The analytics enum mirrors gRPC's names; codes it lacks count as INTERNAL.
        status=getattr(apb, f"REQUEST_STATUS_{code.name}", apb.REQUEST_STATUS_INTERNAL),
        latency_seconds=latency_seconds,
    )
    if reply is not None:
        outcome.time_to_first_token_seconds = reply.timing.time_to_first_token_seconds
        outcome.prompt_tokens = reply.usage.prompt_tokens
        outcome.completion_tokens = reply.usage.completion_tokens
    event = apb.Event(tenant=tenant, adapter=adapter, request=outcome)
    event.time.GetCurrentTime()
    return event


class AnalyticsExporter:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        max_batch: int = 500,
        flush_interval_seconds: float = 1.0,
        max_queue: int = 100_000,
        max_attempts: int = 6,
        timeout_seconds: float = 5.0,
    ) -> None:
        self._stub = apb_grpc.AnalyticsServiceStub(channel)
        self._queue: deque[apb.Event] = deque()
        self._max_batch = max_batch
        self._interval = flush_interval_seconds
        self._max_queue = max_queue
        self._max_attempts = max_attempts
        self._timeout = timeout_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._in_flight = 0
        self.dropped = 0

    def record(self, event: apb.Event) -> None:
        """Never blocks and never raises: the completion it describes is already done."""
        if len(self._queue) >= self._max_queue:
            self._drop(1, "queue full")
            return
        self._queue.append(event)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    def start(self) -> None:
        QUEUED.labels(getattr(self, "name", "analytics")).set_function(lambda: len(self._queue))
        self._task = asyncio.create_task(self._run(), name="analytics-exporter")

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

    async def _send(self, events: list[apb.Event]) -> None:
        request = apb.RecordBatchRequest(batch_id=f"gw-{uuid.uuid4().hex}", events=events)
        delay = 0.1
        for attempt in range(1, self._max_attempts + 1):
            try:
                reply = await self._stub.RecordBatch(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as err:
                if attempt == self._max_attempts or err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self._drop(len(events), f"send failed: {err.code().name}")
                    return
                await asyncio.sleep(delay)  # same batch id: a retry is never double counted
                delay = min(delay * 2, 5.0)
                continue
            EVENTS.labels("sent").inc(reply.accepted)
            EVENTS.labels("rejected").inc(len(reply.rejected))
            return

    def _drop(self, count: int, why: str) -> None:
        if count:
            self.dropped += count
            EVENTS.labels("dropped").inc(count)
            log.warning("analytics events dropped", extra={"count": count, "reason": why})


ITEMS = prometheus_client.Counter(
    "loraplex_batch_export_items_total",
    "Items sent off the request path by exporter and outcome: sent, rejected (by the "
    "receiving service), dropped (queue full or retries exhausted).",
    ["exporter", "outcome"],
)

# send(items) -> (accepted, rejected) counts
Send = Callable[[list[Any]], Awaitable[tuple[int, int]]]


class RpcBatchExporter(AnalyticsExporter):
    """AnalyticsExporter's bounded queue, size/interval flushing and bounded close, with
    another send: any async `send(items)` that raises grpc.aio.AioRpcError to be retried
    (the gateway's active-learning candidates, the feedback forwarder's outcomes)."""

    def __init__(self, channel: grpc.aio.Channel, send: Send, *, name: str, **options: Any):
        super().__init__(channel, **options)
        self.name = name
        self._send_items = send

    async def _send(self, items: list[Any]) -> None:
        delay = 0.1
        for attempt in range(1, self._max_attempts + 1):
            try:
                accepted, rejected = await self._send_items(items)
                break
            except grpc.aio.AioRpcError as err:
                final = err.code() == grpc.StatusCode.INVALID_ARGUMENT
                if final or attempt == self._max_attempts:
                    self._drop(len(items), f"send failed: {err.code().name}")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        ITEMS.labels(self.name, "sent").inc(accepted)
        ITEMS.labels(self.name, "rejected").inc(rejected)

    def _drop(self, count: int, why: str) -> None:
        if count:
            self.dropped += count
            ITEMS.labels(self.name, "dropped").inc(count)
            log.warning(
                "exported items dropped",
                extra={"exporter": self.name, "count": count, "reason": why},
            )
