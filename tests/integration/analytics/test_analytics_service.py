"""The analytics service over real gRPC on a real Redis."""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.analytics.v1 import analytics_service_pb2 as pb
from loraplex.common.v1 import common_pb2
from services.analytics.sketch import ALPHA
from tests.helpers import error_reason

pytestmark = pytest.mark.integration

# A whole hour two hours back: inside every retention, and queries name it exactly.
HOUR_START = (int(time.time()) // 3600 - 2) * 3600


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def request_event(
    tenant: str,
    adapter: str = "support",
    *,
    latency: float = 0.2,
    status: int = pb.REQUEST_STATUS_OK,
    at: float = HOUR_START + 600,
    **kw,
) -> pb.Event:
    extra = {k: kw.pop(k) for k in ("experiment", "variant") if k in kw}
    version = kw.pop("version", 1)
    return pb.Event(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name=adapter, version=version),
        time=ts(at),
        request=pb.RequestOutcome(status=status, latency_seconds=latency, **kw),
        **extra,
    )


def feedback_event(tenant: str, adapter: str, rating: float, **kw) -> pb.Event:
    return pb.Event(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name=adapter, version=1),
        time=ts(HOUR_START + 900),
        feedback=pb.Feedback(rating=rating),
        **kw,
    )


def the_hour(**kw) -> dict:
    return dict(window=Duration(seconds=3600), end_time=ts(HOUR_START + 3600), **kw)


async def metrics(stub, tenant, adapter="support", **kw) -> pb.AdapterMetrics:
    reply = await stub.GetAdapterMetrics(
        pb.GetAdapterMetricsRequest(tenant=tenant, adapter=adapter, **the_hour(**kw))
    )
    return reply.metrics


async def test_health_is_serving(analytics_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{analytics_server.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="loraplex.analytics.v1.AnalyticsService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_record_then_exact_counts_and_quantiles_within_bound(analytics_stub):
    tenant = new_tenant()
    rng = np.random.default_rng(11)
    latencies = rng.lognormal(-1.5, 0.8, 900)
    events = [
        request_event(
            tenant,
            latency=float(lat),
            at=HOUR_START + (i % 60) * 60 + 1,  # spread over the hour's 60 minute buckets
            prompt_tokens=10,
            completion_tokens=5,
            time_to_first_token_seconds=0.05,
        )
        for i, lat in enumerate(latencies)
    ]
    errors = [
        request_event(tenant, latency=1.0, status=pb.REQUEST_STATUS_DEADLINE_EXCEEDED),
        request_event(tenant, latency=1.0, status=pb.REQUEST_STATUS_DEADLINE_EXCEEDED),
        request_event(tenant, latency=1.0, status=pb.REQUEST_STATUS_INTERNAL),
    ]
    ratings = [feedback_event(tenant, "support", r) for r in (5.0, 4.0, 3.0, 4.0)]
    # Two batches, as two replicas of the gateway would send them.
    first = await analytics_stub.RecordBatch(
        pb.RecordBatchRequest(batch_id="b1", events=events[:450])
    )
    second = await analytics_stub.RecordBatch(
        pb.RecordBatchRequest(batch_id="b2", events=events[450:] + errors + ratings)
    )
    assert (first.accepted, second.accepted) == (450, 457)
    assert not first.rejected and not second.duplicate

    m = await metrics(analytics_stub, tenant)
    assert m.requests == 903
    assert m.successes == 900
    assert m.errors == 3
    assert dict(m.errors_by_code) == {"DEADLINE_EXCEEDED": 2, "INTERNAL": 1}
    assert m.success_rate == pytest.approx(900 / 903)
    assert m.prompt_tokens == 9000 and m.completion_tokens == 4500
    all_latencies = np.concatenate([latencies, [1.0, 1.0, 1.0]])
    assert m.latency_mean_seconds == pytest.approx(all_latencies.mean())
    assert m.tokens_per_second == pytest.approx(4500 / all_latencies.sum())
    assert m.time_to_first_token_mean_seconds == pytest.approx(0.05)
    for q, got in ((0.5, m.latency_p50_seconds), (0.95, m.latency_p95_seconds)):
        exact = float(np.quantile(all_latencies, q, method="lower"))
        assert abs(got - exact) <= ALPHA * exact * (1 + 1e-9)
    exact99 = float(np.quantile(all_latencies, 0.99, method="lower"))
    assert abs(m.latency_p99_seconds - exact99) <= ALPHA * exact99 * (1 + 1e-9)
    assert m.rating_count == 4
    assert m.rating_mean == pytest.approx(4.0)
    assert m.rating_stddev == pytest.approx(np.std([5, 4, 3, 4], ddof=1))

    # The same hour read from hour buckets (a window longer than the minute limit) agrees.
    long = await analytics_stub.GetAdapterMetrics(
        pb.GetAdapterMetricsRequest(
            tenant=tenant,
            adapter="support",
            window=Duration(seconds=24 * 3600),
            end_time=ts(HOUR_START + 3600),
        )
    )
    assert long.resolution == pb.RESOLUTION_HOUR
    assert long.metrics.requests == 903
    assert long.metrics.latency_p95_seconds == m.latency_p95_seconds


async def test_duplicate_batch_id_is_counted_once(analytics_stub):
    tenant = new_tenant()
    batch = pb.RecordBatchRequest(
        batch_id="retry-me", events=[request_event(tenant) for _ in range(7)]
    )
    first = await analytics_stub.RecordBatch(batch)
    again = await analytics_stub.RecordBatch(batch)
    assert (first.accepted, first.duplicate) == (7, False)
    assert (again.accepted, again.duplicate) == (7, True)
    assert (await metrics(analytics_stub, tenant)).requests == 7


async def test_bad_events_are_rejected_one_by_one(analytics_stub):
    tenant = new_tenant()
    events = [
        request_event(tenant),
        request_event(tenant, latency=-0.5),
        request_event(tenant, latency=float("nan")),
        request_event(tenant, status=pb.REQUEST_STATUS_UNSPECIFIED),
        request_event(tenant, status=42),  # a number this contract does not define
        request_event(tenant, adapter=""),
        pb.Event(tenant=tenant, adapter=common_pb2.AdapterRef(name="support")),  # no kind
        request_event(tenant),
    ]
    reply = await analytics_stub.RecordBatch(pb.RecordBatchRequest(batch_id="x", events=events))
    assert reply.accepted == 2
    assert [(r.index, r.reason) for r in reply.rejected] == [
        (1, "NEGATIVE_LATENCY"),
        (2, "NOT_FINITE"),
        (3, "UNKNOWN_STATUS"),
        (4, "UNKNOWN_STATUS"),
        (5, "MISSING_ADAPTER"),
        (6, "MISSING_KIND"),
    ]
    assert dict(reply.rejected_by_reason) == {
        "NEGATIVE_LATENCY": 1,
        "NOT_FINITE": 1,
        "UNKNOWN_STATUS": 2,
        "MISSING_ADAPTER": 1,
        "MISSING_KIND": 1,
    }
    assert (await metrics(analytics_stub, tenant)).requests == 2


async def test_oversized_batch_is_invalid_argument(analytics_stub):
    tenant = new_tenant()
    big = pb.RecordBatchRequest(batch_id="big", events=[request_event(tenant)] * 2_001)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await analytics_stub.RecordBatch(big)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "BATCH_TOO_LARGE"
    assert (await metrics(analytics_stub, tenant)).requests == 0


async def test_tenants_never_see_each_other(analytics_stub):
    a, b = new_tenant(), new_tenant()
    events = [request_event(a, "shared-name")] * 3 + [request_event(b, "shared-name")]
    reply = await analytics_stub.RecordBatch(pb.RecordBatchRequest(batch_id="mixed", events=events))
    assert reply.accepted == 4
    assert (await metrics(analytics_stub, a, "shared-name")).requests == 3
    assert (await metrics(analytics_stub, b, "shared-name")).requests == 1
    c = new_tenant()
    assert (await metrics(analytics_stub, c, "shared-name")).requests == 0
    top = await analytics_stub.TopAdapters(
        pb.TopAdaptersRequest(tenant=c, metric=pb.RANK_METRIC_REQUESTS, **the_hour())
    )
    assert list(top.adapters) == []
    # The same batch id from another tenant's events is a different batch.
    again = await analytics_stub.RecordBatch(
        pb.RecordBatchRequest(batch_id="mixed", events=[request_event(c, "shared-name")])
    )
    assert (again.accepted, again.duplicate) == (1, False)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await metrics(analytics_stub, "../" + a, "shared-name")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INVALID_TENANT"


async def test_top_adapters_ordering_ties_and_min_requests(analytics_stub):
    tenant = new_tenant()
    ok, err = pb.REQUEST_STATUS_OK, pb.REQUEST_STATUS_UNAVAILABLE

    def traffic(adapter: str, n_ok: int, n_err: int, latency: float) -> list[pb.Event]:
        return [
            request_event(tenant, adapter, latency=latency, status=ok, completion_tokens=10)
        ] * n_ok + [request_event(tenant, adapter, latency=latency, status=err)] * n_err

    events = (
        traffic("alpha", 9, 1, 0.5)  # 90%, 10 requests
        + traffic("bravo", 18, 2, 0.1)  # 90%, 20 requests: beats alpha on the tie
        + traffic("charlie", 10, 0, 2.0)  # 100%
        + traffic("delta", 9, 1, 0.3)  # 90%, 10 requests: ties alpha, loses on the name
        + traffic("echo", 1, 0, 0.05)  # 100%, but only 1 request
    )
    events += [feedback_event(tenant, "alpha", 5.0), feedback_event(tenant, "delta", 3.0)]
    await analytics_stub.RecordBatch(pb.RecordBatchRequest(batch_id="top", events=events))

    async def top(metric, **kw):
        reply = await analytics_stub.TopAdapters(
            pb.TopAdaptersRequest(tenant=tenant, metric=metric, **the_hour(**kw))
        )
        return [(r.adapter, round(r.value, 6)) for r in reply.adapters]

    assert await top(pb.RANK_METRIC_SUCCESS_RATE, min_requests=2) == [
        ("charlie", 1.0),
        ("bravo", 0.9),
        ("alpha", 0.9),
        ("delta", 0.9),
    ]
    assert [a for a, _ in await top(pb.RANK_METRIC_SUCCESS_RATE)][:2] == ["charlie", "echo"]
    assert [a for a, _ in await top(pb.RANK_METRIC_REQUESTS, limit=2)] == ["bravo", "alpha"]
    assert [a for a, _ in await top(pb.RANK_METRIC_P95_LATENCY)] == [
        "echo",
        "bravo",
        "delta",
        "alpha",
        "charlie",
    ]
    assert await top(pb.RANK_METRIC_AVG_RATING) == [("alpha", 5.0), ("delta", 3.0)]
    tps = await top(pb.RANK_METRIC_TOKENS_PER_SECOND)
    assert tps[0] == ("echo", 200.0)
    assert [a for a, _ in tps[1:]] == ["bravo", "delta", "alpha", "charlie"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await top(pb.RANK_METRIC_UNSPECIFIED)
    assert error_reason(info.value) == "INVALID_METRIC"


async def test_timeseries_and_series_filters(analytics_stub):
    tenant = new_tenant()
    events = [
        request_event(tenant, at=HOUR_START + 120 + 5, experiment="exp1", variant="a"),
        request_event(tenant, at=HOUR_START + 120 + 7, experiment="exp1", variant="b"),
        request_event(tenant, at=HOUR_START + 300, experiment="exp1", variant="b", version=2),
    ]
    await analytics_stub.RecordBatch(pb.RecordBatchRequest(batch_id="ts", events=events))
    reply = await analytics_stub.GetTimeseries(
        pb.GetTimeseriesRequest(
            tenant=tenant,
            adapter="support",
            window=Duration(seconds=600),
            end_time=ts(HOUR_START + 600),
            resolution=pb.RESOLUTION_MINUTE,
        )
    )
    assert reply.resolution == pb.RESOLUTION_MINUTE
    starts = [p.start_time.seconds for p in reply.points]
    assert starts == [HOUR_START + 60 * i for i in range(10)]
    assert [p.metrics.requests for p in reply.points] == [0, 0, 2, 0, 0, 1, 0, 0, 0, 0]
    assert (
        await metrics(analytics_stub, tenant, filter=pb.SeriesFilter(variant="b"))
    ).requests == 2
    only_v2 = pb.SeriesFilter(version=2, experiment="exp1")
    assert (await metrics(analytics_stub, tenant, filter=only_v2)).requests == 1
    none = pb.SeriesFilter(experiment="other")
    assert (await metrics(analytics_stub, tenant, filter=none)).requests == 0


async def test_library_api(redis_url):
    from services import AdapterAnalytics, get_analytics
    from services.analytics.library import Event

    tenant = new_tenant()
    async with get_analytics(redis_url) as analytics:
        assert isinstance(analytics, AdapterAnalytics)
        at = HOUR_START + 60
        events = [Event(tenant=tenant, adapter="lib", latency_seconds=0.1, time=at)] * 4
        result = await analytics.record("lib-1", events)
        assert (result.accepted, result.duplicate) == (4, False)
        m = await analytics.adapter_metrics(tenant, "lib", 3600, end=HOUR_START + 3600)
        assert m.requests == 4
        top = await analytics.top_adapters(tenant, "requests", end=HOUR_START + 3600)
        assert [r.adapter for r in top] == ["lib"]


async def test_library_api_without_redis_url_runs_its_own_redis(monkeypatch):
    from services import get_analytics
    from services.analytics.library import Event

    monkeypatch.delenv("REDIS_URL", raising=False)
    async with get_analytics() as analytics:
        assert analytics.redis.connection_pool.connection_kwargs.get("path")  # unix socket
        event = Event(tenant="solo", adapter="lib", latency_seconds=0.2, time=HOUR_START + 60)
        assert (await analytics.record("solo-1", [event])).accepted == 1
        m = await analytics.adapter_metrics("solo", "lib", 3600, end=HOUR_START + 3600)
        assert m.requests == 1
