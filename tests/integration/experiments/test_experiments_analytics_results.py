"""GetResults from the analytics service's per-variant request aggregates (real analytics and
experiments servers on one real Redis), against statsmodels/scipy on the same requests."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from experiments_testlib import new_tenant, register_adapter
from scipy import stats as st
from statsmodels.stats.proportion import proportions_ztest

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.common.v1 import common_pb2
from loraplex.experiments.v1 import experiments_service_pb2 as pb
from loraplex.experiments.v1 import experiments_service_pb2_grpc as pb_grpc
from services.common.redis import connect
from services.experiments.app import create_server
from services.experiments.settings import ExperimentsSettings
from tests.helpers import error_reason

pytestmark = pytest.mark.integration

KEY = "via-analytics"


async def start_experiment(stub, redis, **kw) -> str:
    tenant = new_tenant()
    await register_adapter(redis, tenant, "a")
    await register_adapter(redis, tenant, "b")
    exp = pb.Experiment(
        key=KEY,
        variants=[
            pb.Variant(name="control", traffic_weight=0.5, adapters=[pb.VariantAdapter(name="a")]),
            pb.Variant(name="treat", traffic_weight=0.5, adapters=[pb.VariantAdapter(name="b")]),
        ],
        primary_metric=pb.Metric(name="success", kind=pb.METRIC_KIND_RATE),
        guardrail_metrics=[
            pb.Metric(name="latency_ms", kind=pb.METRIC_KIND_MEAN, goal=pb.METRIC_GOAL_DECREASE),
            pb.Metric(name="rating", kind=pb.METRIC_KIND_MEAN),
            pb.Metric(name="thumbs_up", kind=pb.METRIC_KIND_RATE),  # custom: from outcomes
            pb.Metric(name="ttft_ms", kind=pb.METRIC_KIND_MEAN, goal=pb.METRIC_GOAL_DECREASE),
        ],
        **kw,
    )
    await stub.CreateExperiment(pb.CreateExperimentRequest(tenant=tenant, experiment=exp))
    await stub.UpdateExperiment(
        pb.UpdateExperimentRequest(tenant=tenant, key=KEY, action=pb.EXPERIMENT_ACTION_START)
    )
    return tenant


def ttft_of(latency: float) -> float:
    return 0.3 * latency + 0.01 * (latency * 1e4 % 7)


def request_event(tenant, variant, ok, latency):
    return apb.Event(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name="a" if variant == "control" else "b"),
        experiment=KEY,
        variant=variant,
        request=apb.RequestOutcome(
            status=apb.REQUEST_STATUS_OK if ok else apb.REQUEST_STATUS_INTERNAL,
            latency_seconds=latency,
            time_to_first_token_seconds=ttft_of(latency),
            completion_tokens=10,
        ),
    )


def rating_event(tenant, variant, rating):
    return apb.Event(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name="a" if variant == "control" else "b"),
        experiment=KEY,
        variant=variant,
        feedback=apb.Feedback(rating=rating),
    )


async def send(analytics, events, tag):
    for i in range(0, len(events), 2000):
        await analytics.RecordBatch(
            apb.RecordBatchRequest(batch_id=f"{tag}-{i}", events=events[i : i + 2000])
        )


async def test_one_request_per_user_matches_statsmodels_and_scipy(
    exp_with_analytics_stub, analytics_stub, exp_redis
):
    stub = exp_with_analytics_stub
    tenant = await start_experiment(stub, exp_redis)
    rng = np.random.default_rng(5)
    ok = {"control": [], "treat": []}
    lat = {"control": [], "treat": []}
    ratings = {"control": [], "treat": []}
    events = []
    for i in range(1500):
        reply = await stub.Assign(
            pb.AssignRequest(tenant=tenant, experiment_key=KEY, unit_id=f"user-{i}")
        )
        v = reply.variant.name
        success = bool(rng.random() < (0.80 if v == "control" else 0.86))
        latency = float(rng.gamma(4.0, 0.05 if v == "control" else 0.045))
        ok[v].append(success)
        lat[v].append(latency)
        events.append(request_event(tenant, v, success, latency))
        if i % 3 == 0:
            r = float(rng.integers(1, 6))
            ratings[v].append(r)
            events.append(rating_event(tenant, v, r))
    await send(analytics_stub, events, tenant)
    # a custom metric keeps coming from RecordOutcomes
    await stub.RecordOutcomes(
        pb.RecordOutcomesRequest(
            tenant=tenant,
            outcomes=[
                pb.Outcome(experiment_key=KEY, unit_id=f"user-{i}", metric="thumbs_up", value=1)
                for i in range(10)
            ],
        )
    )

    res = await stub.GetResults(pb.GetResultsRequest(tenant=tenant, key=KEY))
    success, latency, rating, thumbs, ttft = res.metrics
    assert [m.source for m in res.metrics] == ["analytics"] * 3 + ["outcomes", "analytics"]
    assert [m.analysis_unit for m in res.metrics] == [
        "request",
        "request",
        "rating",
        "user",
        "request",
    ]
    assert list(res.units_per_variant) == [len(ok["control"]), len(ok["treat"])]
    assert list(res.assignments_per_variant) == list(res.units_per_variant)
    assert sum(s.units for s in thumbs.stats) == 10
    for stats, v in zip(success.stats, ("control", "treat"), strict=True):
        assert stats.units == len(ok[v]) and stats.sum == sum(ok[v])
        assert stats.design_effect == 1.0 and stats.effective_units == len(ok[v])
    # success: pooled two-proportion z-test, as statsmodels
    _, p = proportions_ztest(
        [sum(ok["treat"]), sum(ok["control"])], [len(ok["treat"]), len(ok["control"])]
    )
    (c,) = success.comparisons
    assert c.p_value == pytest.approx(p, rel=1e-9)
    assert c.variant_mean - c.control_mean == pytest.approx(
        np.mean(ok["treat"]) - np.mean(ok["control"])
    )
    # latency in ms from the analytics mean and standard deviation: Welch as scipy
    want = st.ttest_ind(
        np.array(lat["treat"]) * 1000, np.array(lat["control"]) * 1000, equal_var=False
    )
    (c,) = latency.comparisons
    assert c.p_value == pytest.approx(want.pvalue, rel=1e-6)
    assert c.control_mean == pytest.approx(np.mean(lat["control"]) * 1000, rel=1e-9)
    assert latency.stats[0].sum_squares == pytest.approx(
        np.sum(np.square(np.array(lat["control"]) * 1000)), rel=1e-9
    )
    # time to first token, from its own count, mean and standard deviation
    ttfts = {v: np.array([ttft_of(x) for x in lat[v]]) * 1000 for v in lat}
    want = st.ttest_ind(ttfts["treat"], ttfts["control"], equal_var=False)
    (c,) = ttft.comparisons
    assert ttft.stats[0].units == len(ttfts["control"])
    assert c.p_value == pytest.approx(want.pvalue, rel=1e-6)
    # rating: one observation per rating
    want = st.ttest_ind(ratings["treat"], ratings["control"], equal_var=False)
    (c,) = rating.comparisons
    assert rating.stats[1].units == len(ratings["treat"])
    assert c.p_value == pytest.approx(want.pvalue, rel=1e-6)
    # SRM counts users, against the weights (chi-square as scipy)
    counts = [len(ok["control"]), len(ok["treat"])]
    assert res.srm_p_value == pytest.approx(st.chisquare(counts).pvalue, rel=1e-9)
    assert any("one observation per request" in n for n in res.notes)
    # once per-user outcomes exist for a metric, they are used instead (users are the unit)
    await stub.RecordOutcomes(
        pb.RecordOutcomesRequest(
            tenant=tenant,
            outcomes=[pb.Outcome(experiment_key=KEY, unit_id="user-0", metric="rating", value=4)],
        )
    )
    res = await stub.GetResults(pb.GetResultsRequest(tenant=tenant, key=KEY))
    assert [m.source for m in res.metrics] == [
        "analytics",
        "analytics",
        "outcomes",
        "outcomes",
        "analytics",
    ]
    assert sum(s.units for s in res.metrics[2].stats) == 1


async def test_several_requests_per_user_inflate_the_variance_by_the_design_effect(
    exp_with_analytics_stub, analytics_stub, exp_redis
):
    stub = exp_with_analytics_stub
    tenant = await start_experiment(stub, exp_redis)
    rng = np.random.default_rng(11)
    m_by_variant = {"control": [], "treat": []}
    ok = {"control": [], "treat": []}
    events = []
    for i in range(400):
        m = int(rng.integers(1, 9))  # this user's requests
        p_user = rng.beta(8, 2)  # users differ: their requests are correlated
        for _ in range(m):
            reply = await stub.Assign(
                pb.AssignRequest(tenant=tenant, experiment_key=KEY, unit_id=f"user-{i}")
            )
            v = reply.variant.name
            success = bool(rng.random() < p_user)
            ok[v].append(success)
            events.append(request_event(tenant, v, success, 0.2))
        m_by_variant[v].append(m)
    await send(analytics_stub, events, tenant)

    res = await stub.GetResults(pb.GetResultsRequest(tenant=tenant, key=KEY))
    success = res.metrics[0]
    assert list(res.units_per_variant) == [len(m_by_variant["control"]), len(m_by_variant["treat"])]
    assert list(res.assignments_per_variant) == [len(ok["control"]), len(ok["treat"])]
    k = {}
    for stats, v in zip(success.stats, ("control", "treat"), strict=True):
        m = np.array(m_by_variant[v])
        k[v] = (m * m).sum() / m.sum()
        assert stats.units == len(ok[v])
        assert stats.design_effect == pytest.approx(k[v], rel=1e-12)
        assert stats.effective_units == pytest.approx(len(ok[v]) / k[v], rel=1e-12)
    # the z-test on the effective counts (statsmodels accepts non-integer counts)
    _, want = proportions_ztest(
        [sum(ok["treat"]) / k["treat"], sum(ok["control"]) / k["control"]],
        [len(ok["treat"]) / k["treat"], len(ok["control"]) / k["control"]],
    )
    _, naive = proportions_ztest(
        [sum(ok["treat"]), sum(ok["control"])], [len(ok["treat"]), len(ok["control"])]
    )
    (c,) = success.comparisons
    assert c.p_value == pytest.approx(want, rel=1e-9)
    assert c.p_value > naive  # the request-level test would overstate the evidence
    assert any("sum(m^2)/sum(m)" in n for n in res.notes)


async def test_results_say_unavailable_when_analytics_does_not_answer(redis_url, exp_redis):
    settings = ExperimentsSettings(
        port=0,
        redis_url=redis_url,
        shutdown_grace_seconds=1,
        analytics_addr="127.0.0.1:1",  # nothing listens there
        analytics_timeout_seconds=2,
    )
    redis = connect(redis_url)
    server, store = create_server(settings, redis)
    await server.start()
    await server.set_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            stub = pb_grpc.ExperimentsServiceStub(chan)
            tenant = await start_experiment(stub, exp_redis)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetResults(pb.GetResultsRequest(tenant=tenant, key=KEY))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(err.value) == "ANALYTICS_UNAVAILABLE"
            assert time.monotonic() - started < 10
    finally:
        await server.stop()
        store.close()
        await redis.aclose()
