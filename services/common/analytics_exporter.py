"""Analytics events off the request path: one event per completion (or rating), sent with
RecordBatch by a BatchExporter. The batch id is kept across retries, so the analytics
service counts a retried batch once. The gateway's go through a durable outbox in Redis
(analytics_outbox), so no outage of analytics loses them.
"""

from __future__ import annotations

from typing import Any

import grpc
import redis.asyncio as aioredis

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from services.common.batch_exporter import BatchExporter
from services.common.keys import PLATFORM, key
from services.common.outbox import RedisOutbox

EXPORTER_NAME = "analytics-events"


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


class AnalyticsExporter(BatchExporter[apb.Event]):
    """record(event) never blocks; batches go out as RecordBatch."""

    def __init__(
        self, channel: grpc.aio.Channel, *, timeout_seconds: float = 5.0, **options: Any
    ) -> None:
        self._stub = apb_grpc.AnalyticsServiceStub(channel)
        self._timeout = timeout_seconds
        super().__init__(self._record_batch, name=EXPORTER_NAME, **options)

    async def _record_batch(self, events: list[apb.Event], batch_id: str) -> tuple[int, int]:
        request = apb.RecordBatchRequest(batch_id=batch_id, events=events)
        reply = await self._stub.RecordBatch(request, timeout=self._timeout)
        return reply.accepted, len(reply.rejected)


def analytics_outbox(
    redis: aioredis.Redis, instance: str, max_events: int
) -> RedisOutbox[apb.Event]:
    """The outbox of one sender instance (e.g. a gateway): a stream of its own, so after a
    restart under the same name it sends what its previous run left."""
    return RedisOutbox(
        redis,
        key(PLATFORM, "outbox", EXPORTER_NAME, instance),
        batch_prefix=f"outbox:{instance}",
        encode=apb.Event.SerializeToString,
        decode=apb.Event.FromString,
        max_length=max_events,
    )
