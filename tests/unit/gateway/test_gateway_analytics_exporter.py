"""The gateway's analytics exporter against a fake analytics service on a real gRPC server,
with and without its durable outbox (on a real Redis)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import grpc
import prometheus_client
import pytest
import redis.asyncio as aioredis

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.common.v1 import common_pb2
from services.common.analytics_exporter import (
    EXPORTER_NAME,
    AnalyticsExporter,
    analytics_outbox,
    completion_event,
)
from services.common.channels import open_channel
from services.common.errors import Unavailable
from services.common.localhost import free_port
from services.common.outbox import RedisOutbox
from services.common.redis import connect
from services.common.server import Server, ServiceSpec
from services.common.settings import ServiceSettings
from tests.helpers import StoppableRedis


class FakeAnalytics(apb_grpc.AnalyticsServiceServicer):
    def __init__(self, failures: int = 0) -> None:
        self.batches: list[apb.RecordBatchRequest] = []
        self.failures = failures

    async def RecordBatch(self, request, context):
        self.batches.append(request)
        if self.failures:
            self.failures -= 1
            raise Unavailable("try again")
        return apb.RecordBatchResponse(accepted=len(request.events))


@pytest.fixture
async def fake_analytics():
    fake = FakeAnalytics()
    spec = ServiceSpec(
        "loraplex.analytics.v1.AnalyticsService",
        fake,
        apb_grpc.add_AnalyticsServiceServicer_to_server,
    )
    server = Server(ServiceSettings(port=0, shutdown_grace_seconds=0.1), [spec])
    await server.start()
    channel = open_channel(f"127.0.0.1:{server.port}")
    yield fake, channel
    await channel.close()
    await server.stop()


def event(i: int = 0) -> apb.Event:
    return completion_event("bank", common_pb2.AdapterRef(name=f"a{i}"), 0.1)


async def test_events_are_sent_in_batches_of_at_most_max_batch(fake_analytics):
    fake, channel = fake_analytics
    exporter = AnalyticsExporter(channel, max_batch=500, flush_interval_seconds=0.05)
    exporter.start()
    for i in range(1200):
        exporter.record(event(i))
    await exporter.close()
    assert [len(b.events) for b in fake.batches] == [500, 500, 200]
    assert len({b.batch_id for b in fake.batches}) == 3
    assert exporter.dropped == 0


async def test_a_failed_send_is_retried_under_the_same_batch_id(fake_analytics):
    fake, channel = fake_analytics
    fake.failures = 2
    exporter = AnalyticsExporter(channel, flush_interval_seconds=0.05)
    exporter.start()
    exporter.record(event())
    await exporter.close()
    assert len(fake.batches) == 3
    assert len({b.batch_id for b in fake.batches}) == 1
    assert exporter.dropped == 0


async def test_a_dead_analytics_service_never_blocks_and_drops_are_counted():
    channel = open_channel(f"127.0.0.1:{free_port()}")  # nothing listens there
    exporter = AnalyticsExporter(
        channel, max_queue=10, flush_interval_seconds=0.05, max_attempts=2, timeout_seconds=0.2
    )
    exporter.start()
    started = time.perf_counter()
    for i in range(15):
        exporter.record(event(i))
    assert time.perf_counter() - started < 0.05  # record() never waits on the network
    assert exporter.dropped == 5  # past the queue's bound
    await exporter.close(timeout_seconds=3)
    assert exporter.dropped == 15
    await channel.close()


def test_completion_event_carries_the_reply_counts():
    reply_event = completion_event(
        "bank", common_pb2.AdapterRef(name="x", version=2), 0.5, grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert reply_event.request.status == apb.REQUEST_STATUS_RESOURCE_EXHAUSTED
    assert reply_event.adapter.version == 2 and reply_event.request.latency_seconds == 0.5
    assert reply_event.time.seconds > 0


async def test_close_without_start_is_harmless(fake_analytics):
    _, channel = fake_analytics
    await asyncio.wait_for(AnalyticsExporter(channel).close(), 1)


def test_per_adapter_series_are_bounded():
    import prometheus_client

    from gateway.adapter_metrics import OTHER, AdapterSeries

    def count(tenant: str, adapter: str) -> float:
        sample = prometheus_client.REGISTRY.get_sample_value(
            "loraplex_adapter_requests_total",
            {"tenant": tenant, "adapter": adapter, "code": "OK"},
        )
        return sample or 0.0

    series = AdapterSeries(limit=2)
    before_other = count(OTHER, OTHER)
    for adapter in ("bounded-a", "bounded-b", "bounded-c", "bounded-d", "bounded-a"):
        series.observe("metrics-t", adapter, "OK", 0.1)
    assert count("metrics-t", "bounded-a") == 2 and count("metrics-t", "bounded-b") == 1
    assert count("metrics-t", "bounded-c") == 0  # past the limit: no series of its own
    assert count(OTHER, OTHER) == before_other + 2


# The durable outbox (services/common/outbox.py) on a real Redis.


def outbox(redis: aioredis.Redis, max_events: int = 1000) -> RedisOutbox[apb.Event]:
    return analytics_outbox(redis, f"test-{uuid.uuid4().hex[:8]}", max_events)


def gauge(name: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name, {"exporter": EXPORTER_NAME})
    return value or 0.0


async def test_a_batch_whose_retries_ran_out_waits_in_the_outbox(fake_analytics, redis_client):
    fake, channel = fake_analytics
    fake.failures = 2  # as many as one flush tries
    exporter = AnalyticsExporter(channel, max_attempts=2, outbox=outbox(redis_client))
    for i in range(3):
        await exporter.add(event(i))
    await exporter.flush()  # two attempts, then kept for the next flush
    assert exporter.exhausted == 1 and exporter.dropped == 0
    assert gauge("loraplex_outbox_items") == 3
    await exporter.flush()  # the third attempt: accepted
    await exporter.flush()  # nothing left
    assert [len(b.events) for b in fake.batches] == [3, 3, 3]
    assert len({b.batch_id for b in fake.batches}) == 1  # counted once by analytics
    assert gauge("loraplex_outbox_items") == 0 and gauge("loraplex_outbox_lag_seconds") == 0


async def test_a_restarted_sender_resends_its_last_batch_under_the_same_id(
    fake_analytics, redis_client
):
    fake, channel = fake_analytics
    box = outbox(redis_client)
    crashed = AnalyticsExporter(channel, max_batch=2, outbox=box)
    for i in range(3):
        await crashed.add(event(i))
    read = await box.take(2)  # it read a batch and died before its ack, or after its send
    assert read is not None
    restarted = AnalyticsExporter(channel, max_batch=2, outbox=box)
    await restarted.flush()
    assert fake.batches[0].batch_id == read.batch_id
    assert [[e.adapter.name for e in b.events] for b in fake.batches] == [["a0", "a1"], ["a2"]]
    assert await redis_client.xlen(box.key) == 0


async def test_a_full_outbox_drops_the_newest_and_counts_them(redis_client):
    channel = open_channel(f"127.0.0.1:{free_port()}")  # nothing listens there
    exporter = AnalyticsExporter(channel, outbox=outbox(redis_client, max_events=3))
    for i in range(5):
        await exporter.add(event(i))
    assert exporter.dropped == 2
    box = exporter._outbox
    assert box is not None and await redis_client.xlen(box.key) == 3
    await channel.close()


async def test_events_added_while_redis_is_down_reach_the_outbox_when_it_is_back(
    fake_analytics,
):
    fake, channel = fake_analytics
    server = StoppableRedis()
    server.start()
    redis = connect(server.url)
    try:
        exporter = AnalyticsExporter(channel, outbox=outbox(redis))
        await exporter.add(event(0))
        server.stop(signal.SIGKILL)
        started = time.perf_counter()
        for i in range(1, 4):
            await exporter.add(event(i))  # kept in memory, never raises
        assert time.perf_counter() - started < 1
        await exporter.flush()  # Redis still down: nothing sent, nothing lost
        assert fake.batches == [] and exporter.dropped == 0
        server.start()  # no persistence: event 0 died with Redis, 1-3 are in memory
        await exporter.flush()
        assert [e.adapter.name for b in fake.batches for e in b.events] == ["a1", "a2", "a3"]
    finally:
        await redis.aclose()
        server.stop()
