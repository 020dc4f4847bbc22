"""The gateway's analytics exporter against a fake analytics service on a real gRPC server."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.common.v1 import common_pb2
from services.common.analytics_exporter import AnalyticsExporter, completion_event
from services.common.channels import open_channel
from services.common.errors import Unavailable
from services.common.localhost import free_port
from services.common.server import Server, ServiceSpec
from services.common.settings import ServiceSettings


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
