"""The rules docs/analytics.md states, with its numbers written out here (not read from the
settings or constants under test), against the real service on a real Redis: a change to
any of them fails a test."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from loraplex.analytics.v1 import analytics_service_pb2 as pb
from services import get_analytics
from services.analytics.library import Event
from services.common.errors import InvalidArgument
from services.common.redis import connect
from tests.helpers import error_reason
from tests.integration.analytics.test_analytics_service import (
    HOUR_START,
    metrics,
    new_tenant,
    request_event,
    ts,
)

pytestmark = pytest.mark.integration

DAY = 24 * 3600
# What docs/analytics.md promises.
BATCH_ID_WINDOW = DAY
MINUTE_RETENTION = 2 * DAY
HOUR_RETENTION = 30 * DAY
MINUTE_QUERY_MAX = 3 * 3600
MAX_FUTURE_SKEW = 300
MAX_BATCH_EVENTS = 10_000
MAX_BUCKETS = 2_000
DEFAULT_LIMIT, MAX_LIMIT = 10, 1000


def event(tenant: str, at: float = HOUR_START + 600, adapter: str = "support") -> pb.Event:
    return request_event(tenant, adapter, at=at)


@pytest.fixture
async def redis(redis_url):
    client = connect(redis_url)
    yield client
    await client.aclose()


async def test_a_batch_id_is_remembered_for_24_hours(analytics_stub, redis):
    t = new_tenant()
    batch = pb.RecordBatchRequest(batch_id="once", events=[event(t)] * 3)
    assert not (await analytics_stub.RecordBatch(batch)).duplicate
    ttl = await redis.ttl(f"lp:{{{t}}}:an:batch:once")
    assert BATCH_ID_WINDOW - 60 <= ttl <= BATCH_ID_WINDOW
    await asyncio.sleep(2.5)  # a client's retry a few seconds later is still a duplicate
    again = await analytics_stub.RecordBatch(batch)
    assert (again.accepted, again.duplicate) == (3, True)
    assert (await metrics(analytics_stub, t)).requests == 3


async def test_buckets_expire_at_their_end_plus_the_retention(analytics_stub, redis):
    t = new_tenant()
    minute = HOUR_START + 600
    await analytics_stub.RecordBatch(
        pb.RecordBatchRequest(batch_id="keep", events=[event(t, minute + 5)])
    )
    prefix = f"lp:{{{t}}}:an"
    for res, start, life in (
        ("m", minute, 60 + MINUTE_RETENTION),
        ("h", HOUR_START, 3600 + HOUR_RETENTION),
    ):
        for suffix in ("c:support", "s:support", "rank"):
            k = f"{prefix}:{res}:{start}:{suffix}"
            assert await redis.execute_command("EXPIRETIME", k) == start + life, k


async def test_events_older_than_the_hour_retention_are_rejected(analytics_stub):
    t, now = new_tenant(), time.time()
    events = [event(t, now - HOUR_RETENTION + 120), event(t, now - HOUR_RETENTION - 120)]
    reply = await analytics_stub.RecordBatch(pb.RecordBatchRequest(batch_id="old", events=events))
    assert reply.accepted == 1
    assert [(r.index, r.reason) for r in reply.rejected] == [(1, "TIMESTAMP_TOO_OLD")]


async def test_events_up_to_5_minutes_ahead_are_accepted(analytics_stub):
    t, now = new_tenant(), time.time()
    events = [event(t, now + MAX_FUTURE_SKEW - 20), event(t, now + MAX_FUTURE_SKEW + 20)]
    reply = await analytics_stub.RecordBatch(pb.RecordBatchRequest(batch_id="soon", events=events))
    assert reply.accepted == 1
    assert [(r.index, r.reason) for r in reply.rejected] == [(1, "TIMESTAMP_IN_FUTURE")]


async def test_windows_up_to_3_hours_read_minutes_longer_ones_hours(analytics_stub):
    async def covered(window: float, end: float):
        reply = await analytics_stub.GetAdapterMetrics(
            pb.GetAdapterMetricsRequest(
                tenant=new_tenant(),
                adapter="support",
                window=Duration(seconds=int(window)),
                end_time=ts(end),
            )
        )
        return reply.resolution, reply.start_time.seconds, reply.end_time.seconds

    end = HOUR_START + 7 * 60 + 30  # "16:07"
    assert (await covered(MINUTE_QUERY_MAX, end))[0] == pb.RESOLUTION_MINUTE
    assert (await covered(MINUTE_QUERY_MAX + 1, end))[0] == pb.RESOLUTION_HOUR
    # The documented example: 24 h ending 16:07 covers 16:00 a day earlier up to 17:00.
    assert await covered(DAY, end) == (pb.RESOLUTION_HOUR, HOUR_START - DAY, HOUR_START + 3600)
    # 1 h ending 16:07:30 covers whole minutes: 15:07 up to 16:08.
    assert await covered(3600, end) == (pb.RESOLUTION_MINUTE, end - 30 - 3600, end + 30)


async def test_a_window_may_not_exceed_the_retention_nor_2000_buckets(analytics_stub):
    async def timeseries(window: int, resolution=pb.RESOLUTION_UNSPECIFIED):
        return await analytics_stub.GetTimeseries(
            pb.GetTimeseriesRequest(
                tenant=new_tenant(),
                adapter="support",
                window=Duration(seconds=window),
                end_time=ts(HOUR_START),
                resolution=resolution,
            )
        )

    assert len((await timeseries(HOUR_RETENTION)).points) == HOUR_RETENTION // 3600
    minutes = await timeseries(MAX_BUCKETS * 60, pb.RESOLUTION_MINUTE)
    assert len(minutes.points) == MAX_BUCKETS
    for window, resolution in (
        (HOUR_RETENTION + 1, pb.RESOLUTION_UNSPECIFIED),
        ((MAX_BUCKETS + 1) * 60, pb.RESOLUTION_MINUTE),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await timeseries(window, resolution)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(info.value) == "INVALID_WINDOW"


async def test_top_adapters_limit_defaults_to_10_and_stops_at_1000(analytics_stub):
    t = new_tenant()
    events = [event(t, adapter=f"a{i:02d}") for i in range(12)]
    await analytics_stub.RecordBatch(pb.RecordBatchRequest(batch_id="many", events=events))

    async def top(limit: int):
        return await analytics_stub.TopAdapters(
            pb.TopAdaptersRequest(
                tenant=t,
                metric=pb.RANK_METRIC_REQUESTS,
                limit=limit,
                window=Duration(seconds=3600),
                end_time=ts(HOUR_START + 3600),
            )
        )

    assert len((await top(0)).adapters) == DEFAULT_LIMIT
    assert len((await top(MAX_LIMIT)).adapters) == 12
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await top(MAX_LIMIT + 1)
    assert error_reason(info.value) == "INVALID_LIMIT"


async def test_a_batch_holds_at_most_10000_events_by_default(redis_url):
    """The default settings (config/analytics.yaml and the settings class; the shared
    test server lowers the limit)."""
    t = new_tenant()
    one = Event(t, "support", 1, time=HOUR_START + 60, latency_seconds=0.1)
    async with get_analytics(redis_url) as analytics:
        assert (await analytics.record("full", [one] * MAX_BATCH_EVENTS)).accepted == 10_000
        with pytest.raises(InvalidArgument) as info:
            await analytics.record("over", [one] * (MAX_BATCH_EVENTS + 1))
    assert info.value.reason == "BATCH_TOO_LARGE"
