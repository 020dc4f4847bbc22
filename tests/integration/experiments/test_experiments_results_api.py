"""RecordOutcomes and GetResults over gRPC; the library API against the same Redis."""

from __future__ import annotations

import grpc
import pytest
from experiments_testlib import new_tenant, register_adapter

from loraplex.experiments.v1 import experiments_service_pb2 as pb
from services.common.errors import NotFound
from services.experiments import stats
from services.experiments.reporting import experiment_results
from services.experiments.settings import ExperimentsSettings
from tests.helpers import error_reason

pytestmark = pytest.mark.integration


async def running_experiment(stub, redis, **kw) -> str:
    tenant = new_tenant()
    await register_adapter(redis, tenant, "a")
    await register_adapter(redis, tenant, "b")
    exp = pb.Experiment(
        key="res",
        variants=[
            pb.Variant(name="control", traffic_weight=0.5, adapters=[pb.VariantAdapter(name="a")]),
            pb.Variant(name="treat", traffic_weight=0.5, adapters=[pb.VariantAdapter(name="b")]),
        ],
        primary_metric=pb.Metric(name="success", kind=pb.METRIC_KIND_RATE),
        guardrail_metrics=[
            pb.Metric(name="latency_ms", kind=pb.METRIC_KIND_MEAN, goal=pb.METRIC_GOAL_DECREASE)
        ],
        **kw,
    )
    await stub.CreateExperiment(pb.CreateExperimentRequest(tenant=tenant, experiment=exp))
    await stub.UpdateExperiment(
        pb.UpdateExperimentRequest(tenant=tenant, key="res", action=pb.EXPERIMENT_ACTION_START)
    )
    return tenant


async def test_outcomes_are_aggregated_per_unit_and_results_match_the_statistics(
    exp_stub, exp_redis
):
    tenant = await running_experiment(exp_stub, exp_redis)
    per_variant = {0: [], 1: []}
    outcomes = []
    for i in range(400):
        uid = f"user-{i}"
        reply = await exp_stub.Assign(
            pb.AssignRequest(tenant=tenant, experiment_key="res", unit_id=uid)
        )
        v = reply.variant_index
        converted = (i % 10) < (3 if v == 1 else 2)
        lat = [100.0 + i % 7, 120.0 + v * 10]  # two requests: the unit's value is their mean
        per_variant[v].append((float(converted), sum(lat) / 2))
        # a unit that fails then succeeds counts as converted once
        outcomes += [
            pb.Outcome(experiment_key="res", unit_id=uid, metric="success", value=0.0),
            pb.Outcome(experiment_key="res", unit_id=uid, metric="success", value=float(converted)),
        ]
        outcomes += [
            pb.Outcome(experiment_key="res", unit_id=uid, metric="latency_ms", value=x) for x in lat
        ]
    outcomes.append(pb.Outcome(experiment_key="res", unit_id="never", metric="success", value=1))
    for start in range(0, len(outcomes), 1000):
        await exp_stub.RecordOutcomes(
            pb.RecordOutcomesRequest(tenant=tenant, outcomes=outcomes[start : start + 1000])
        )
    res = await exp_stub.GetResults(pb.GetResultsRequest(tenant=tenant, key="res"))

    assert list(res.units_per_variant) == [len(per_variant[0]), len(per_variant[1])]
    success, latency = res.metrics
    assert not success.guardrail and latency.guardrail
    for i in (0, 1):
        conv = [c for c, _ in per_variant[i]]
        assert success.stats[i].units == len(conv)
        assert success.stats[i].sum == pytest.approx(sum(conv))
        lats = [lat for _, lat in per_variant[i]]
        assert latency.stats[i].sum == pytest.approx(sum(lats))
        assert latency.stats[i].sum_squares == pytest.approx(sum(x * x for x in lats))
    want = stats.two_proportion_ztest(
        stats.Aggregate.rate(len(per_variant[0]), sum(c for c, _ in per_variant[0])),
        stats.Aggregate.rate(len(per_variant[1]), sum(c for c, _ in per_variant[1])),
    )
    (comp,) = success.comparisons
    assert comp.p_value == pytest.approx(want.p_value)
    assert comp.relative_lift == pytest.approx(want.relative_lift)
    assert 0 <= comp.chance_to_beat_control <= 1 and comp.expected_loss >= 0
    assert res.srm_p_value > 0.001 and not res.srm_detected
    assert res.required_units_per_variant > 0
    assert res.recommendation != pb.RECOMMENDATION_UNSPECIFIED and res.recommendation_reason


async def test_unassigned_units_are_skipped_and_bad_outcomes_rejected(exp_stub, exp_redis):
    tenant = await running_experiment(exp_stub, exp_redis)
    await exp_stub.Assign(pb.AssignRequest(tenant=tenant, experiment_key="res", unit_id="u1"))
    reply = await exp_stub.RecordOutcomes(
        pb.RecordOutcomesRequest(
            tenant=tenant,
            outcomes=[
                pb.Outcome(experiment_key="res", unit_id="u1", metric="success", value=1),
                pb.Outcome(experiment_key="res", unit_id="u2", metric="success", value=1),
            ],
        )
    )
    assert (reply.recorded, reply.skipped) == (1, 1)
    for outcome, reason in [
        (pb.Outcome(experiment_key="res", unit_id="u1", metric="nope", value=1), "UNKNOWN_METRIC"),
        (
            pb.Outcome(experiment_key="res", unit_id="u1", metric="success", value=0.5),
            "INVALID_OUTCOME_VALUE",
        ),
        (pb.Outcome(experiment_key="res", unit_id="", metric="success", value=1), "EMPTY_UNIT_ID"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await exp_stub.RecordOutcomes(
                pb.RecordOutcomesRequest(tenant=tenant, outcomes=[outcome])
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(info.value) == reason
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await exp_stub.GetResults(pb.GetResultsRequest(tenant=new_tenant(), key="res"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_library_api_end_to_end(redis_url, exp_redis):
    from services import ABTestingFramework, get_ab_framework

    tenant = new_tenant()
    await register_adapter(exp_redis, tenant, "support")
    await register_adapter(exp_redis, tenant, "support-v2")
    ab = get_ab_framework(redis_url)
    assert isinstance(ab, ABTestingFramework) and get_ab_framework() is ab
    try:
        exp = await ab.create_experiment(
            tenant,
            "lib",
            [
                {"name": "control", "adapters": ["support"], "traffic_weight": 0.5},
                {"name": "treatment", "adapters": ["support-v2"], "traffic_weight": 0.5},
            ],
            start=True,
        )
        assert exp.status == "running"
        assert [e.key for e in await ab.list_experiments(tenant)] == ["lib"]
        got = await ab.assign(tenant, "lib", "alice")
        assert got.in_experiment and got.variant.adapters[0].name in ("support", "support-v2")
        assert await ab.record_outcome(tenant, "lib", "alice", "success", 1)
        assert not await ab.record_outcome(tenant, "lib", "bob", "success", 1)
        results = await ab.get_results(tenant, "lib")
        assert sum(results.units_per_variant) == 1
        assert results.recommendation == "keep_running"
        # aggregates from elsewhere (e.g. the analytics service) can be analysed too
        fed = await ab.get_results(
            tenant,
            "lib",
            aggregates={
                "success": [stats.Aggregate.rate(20000, 2000), stats.Aggregate.rate(20000, 2600)]
            },
            units_per_variant=[20000, 20000],
        )
        assert fed.recommendation == "ship"
        stopped = await ab.stop(tenant, "lib")
        assert stopped.status == "stopped"
    finally:
        await ab.close()


async def test_library_without_redis_url_starts_an_embedded_redis(monkeypatch, tmp_path):
    from services.experiments import library

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(library, "_default", None)
    ab = library.get_ab_framework()
    try:
        assert ab._embedded is not None
        with pytest.raises(NotFound):  # a working store on an empty server
            await ab.get_experiment("someone", "nothing")
    finally:
        await ab.close()


async def test_sequential_p_value_is_the_running_minimum_over_looks(
    exp_stub, exp_redis, experiments_server
):
    """Always-valid p-values are monotone: p_n = min(p_{n-1}, 1/Lambda_n). A strong early
    effect diluted by later null data lowers 1/Lambda and then raises it again; the reported
    value keeps its minimum, in Redis (another replica reports the same), per bucket
    version."""
    tenant = await running_experiment(exp_stub, exp_redis, minimum_detectable_effect=0.5)

    async def record(first: int, count: int, rate: dict[int, float]) -> None:
        outcomes = []
        for i in range(first, first + count):
            uid = f"u{i}"
            v = (
                await exp_stub.Assign(
                    pb.AssignRequest(tenant=tenant, experiment_key="res", unit_id=uid)
                )
            ).variant_index
            value = float((i * 7919 % 1000) / 1000 < rate[v])
            outcomes.append(
                pb.Outcome(experiment_key="res", unit_id=uid, metric="success", value=value)
            )
        for start in range(0, len(outcomes), 1000):
            await exp_stub.RecordOutcomes(
                pb.RecordOutcomesRequest(tenant=tenant, outcomes=outcomes[start : start + 1000])
            )

    async def look() -> tuple[float, float]:
        res = await exp_stub.GetResults(pb.GetResultsRequest(tenant=tenant, key="res"))
        (c,) = res.metrics[0].comparisons
        ctl, var = res.metrics[0].stats
        current = stats.msprt(
            stats.Aggregate.rate(ctl.units, ctl.sum),
            stats.Aggregate.rate(var.units, var.sum),
            (1.0 * 0.5 * ctl.sum / ctl.units) ** 2,  # results._tau2: tau = MDE x baseline
            rate=True,
        ).p_value
        return c.sequential_p_value, current

    await record(0, 400, {0: 0.2, 1: 0.45})  # a strong effect early
    first, current = await look()
    assert first == pytest.approx(current) and first < 0.05
    await record(400, 4000, {0: 0.3, 1: 0.3})  # then a long stretch of no difference
    second, current = await look()
    assert current > first  # 1/Lambda alone went back up ...
    assert second == first  # ... the reported p-value did not
    # kept in Redis: a store that never saw the first look reports the same
    _, store = experiments_server
    exp = await store.get(tenant, "res")
    again = await experiment_results(store, exp, ExperimentsSettings())
    assert again.sequential == {"outcomes|success|treat": first}
    # a new bucket version starts afresh
    await exp_stub.UpdateExperiment(
        pb.UpdateExperimentRequest(tenant=tenant, key="res", bump_bucket_version=True)
    )
    res = await exp_stub.GetResults(pb.GetResultsRequest(tenant=tenant, key="res"))
    assert not res.metrics[0].comparisons and sum(res.units_per_variant) == 0
