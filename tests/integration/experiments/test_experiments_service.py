"""The experiments service over real gRPC and real Redis: lifecycle, assignment, bad input."""

from __future__ import annotations

import grpc
import pytest
from experiments_testlib import new_tenant, register_adapter, unregister_adapter
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.experiments.v1 import experiments_service_pb2 as pb
from services.common.keys import PLATFORM
from services.experiments import assignment
from tests.helpers import error_reason

pytestmark = pytest.mark.integration


def variant(name: str, weight: float, *adapters: str) -> pb.Variant:
    return pb.Variant(
        name=name,
        traffic_weight=weight,
        adapters=[pb.VariantAdapter(name=a) for a in adapters],
    )


def experiment(key: str = "new-adapter", weights=(0.5, 0.5), **kw) -> pb.Experiment:
    names = ["control", "treatment", "third", "fourth"]
    adapters = kw.pop("adapters", ["support-v1", "support-v2", "support-v1", "support-v1"])
    variants = kw.pop(
        "variants", [variant(names[i], w, adapters[i]) for i, w in enumerate(weights)]
    )
    return pb.Experiment(key=key, variants=variants, **kw)


async def tenant_with_adapters(exp_redis) -> str:
    tenant = new_tenant()
    await register_adapter(exp_redis, tenant, "support-v1")
    await register_adapter(exp_redis, tenant, "support-v2")
    return tenant


async def create(stub, tenant: str, start: bool = True, **kw) -> pb.Experiment:
    reply = await stub.CreateExperiment(
        pb.CreateExperimentRequest(tenant=tenant, experiment=experiment(**kw))
    )
    if start:
        reply = await stub.UpdateExperiment(
            pb.UpdateExperimentRequest(
                tenant=tenant, key=reply.experiment.key, action=pb.EXPERIMENT_ACTION_START
            )
        )
    return reply.experiment


async def expect_error(call, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert error_reason(info.value) == reason
    assert info.value.details()  # a message a person can read


async def test_health_is_serving(experiments_server):
    server, _ = experiments_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        health = health_pb2_grpc.HealthStub(chan)
        for service in ("", "loraplex.experiments.v1.ExperimentsService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_create_get_list_and_lifecycle(exp_stub, exp_redis):
    tenant = await tenant_with_adapters(exp_redis)
    created = await create(exp_stub, tenant, start=False, description="v2 vs v1")
    assert created.status == pb.EXPERIMENT_STATUS_DRAFT
    assert created.hash_seed == "new-adapter" and created.hash_version == 2
    assert created.coverage == 1.0 and created.bucket_version == 1
    assert created.primary_metric.name == "success"
    assert [a.name for a in created.variants[1].adapters] == ["support-v2"]
    assert created.variants[1].adapters[0].weight == 1.0

    got = await exp_stub.GetExperiment(pb.GetExperimentRequest(tenant=tenant, key="new-adapter"))
    assert got.experiment == created

    # a draft does not assign
    await expect_error(
        exp_stub.Assign(pb.AssignRequest(tenant=tenant, experiment_key="new-adapter", unit_id="u")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_NOT_RUNNING",
    )
    started = await exp_stub.UpdateExperiment(
        pb.UpdateExperimentRequest(
            tenant=tenant, key="new-adapter", action=pb.EXPERIMENT_ACTION_START
        )
    )
    assert started.experiment.status == pb.EXPERIMENT_STATUS_RUNNING
    assert started.experiment.start_time.seconds > 0
    reply = await exp_stub.Assign(
        pb.AssignRequest(tenant=tenant, experiment_key="new-adapter", unit_id="user-1")
    )
    assert reply.in_experiment and reply.variant.name in ("control", "treatment")

    stopped = await exp_stub.UpdateExperiment(
        pb.UpdateExperimentRequest(
            tenant=tenant, key="new-adapter", action=pb.EXPERIMENT_ACTION_STOP
        )
    )
    assert stopped.experiment.status == pb.EXPERIMENT_STATUS_STOPPED
    await expect_error(
        exp_stub.Assign(
            pb.AssignRequest(tenant=tenant, experiment_key="new-adapter", unit_id="user-1")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_NOT_RUNNING",
    )
    await expect_error(
        exp_stub.UpdateExperiment(
            pb.UpdateExperimentRequest(
                tenant=tenant, key="new-adapter", action=pb.EXPERIMENT_ACTION_START
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_NOT_DRAFT",
    )


async def test_list_pages_through_every_experiment_and_filters_by_status(exp_stub, exp_redis):
    tenant = await tenant_with_adapters(exp_redis)
    for i in range(5):
        await create(exp_stub, tenant, start=i % 2 == 0, key=f"exp-{i}")
    seen, token = [], ""
    while True:
        page = await exp_stub.ListExperiments(
            pb.ListExperimentsRequest(tenant=tenant, page_size=2, page_token=token)
        )
        assert len(page.experiments) <= 2
        seen += [e.key for e in page.experiments]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"exp-{i}" for i in range(5)]
    running = await exp_stub.ListExperiments(
        pb.ListExperimentsRequest(tenant=tenant, status=pb.EXPERIMENT_STATUS_RUNNING)
    )
    assert [e.key for e in running.experiments] == ["exp-0", "exp-2", "exp-4"]
    await expect_error(
        exp_stub.ListExperiments(pb.ListExperimentsRequest(tenant=tenant, page_token="junk")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_PAGE_TOKEN",
    )


async def test_assignment_matches_growthbook_and_is_deterministic(exp_stub, exp_redis):
    tenant = await tenant_with_adapters(exp_redis)
    await create(
        exp_stub,
        tenant,
        key="gb",
        weights=(0.2, 0.8),
        coverage=0.6,
        hash_seed="seed-x",
        hash_version=1,
        namespace=pb.Namespace(name="support", range_start=0.0, range_end=0.7),
    )
    counts = [0, 0, 0]
    for i in range(300):
        uid = f"user-{i}"
        request = pb.AssignRequest(tenant=tenant, experiment_key="gb", unit_id=uid)
        reply = await exp_stub.Assign(request)
        want = assignment.assign(uid, "seed-x", 1, [0.2, 0.8], 0.6, ("support", 0.0, 0.7))
        assert reply.variant_index == want.variant_index
        assert reply.in_experiment == want.in_experiment
        assert reply.bucket == pytest.approx(want.bucket)
        # the variant that serves: the control for a unit left out
        assert reply.variant.name == ("control", "treatment")[max(want.variant_index, 0)]
        again = await exp_stub.Assign(request)
        assert again.variant_index == reply.variant_index
        assert again.sticky == reply.in_experiment
        counts[reply.variant_index + 1] += 1
    assert all(counts), counts  # excluded, control and treatment all occur


async def test_sticky_assignment_survives_weight_changes_until_bucket_version_bump(
    exp_stub, exp_redis
):
    tenant = await tenant_with_adapters(exp_redis)
    await create(exp_stub, tenant, key="sticky", weights=(0.5, 0.5))
    units = [f"u{i}" for i in range(200)]
    before = {}
    for uid in units:
        reply = await exp_stub.Assign(
            pb.AssignRequest(tenant=tenant, experiment_key="sticky", unit_id=uid)
        )
        before[uid] = reply.variant.name

    changed = await exp_stub.UpdateExperiment(
        pb.UpdateExperimentRequest(
            tenant=tenant,
            key="sticky",
            update_mask=FieldMask(paths=["traffic_weights", "coverage"]),
            experiment=pb.Experiment(
                variants=[
                    pb.Variant(name="control", traffic_weight=0.1),
                    pb.Variant(name="treatment", traffic_weight=0.9),
                ],
                coverage=0.5,
            ),
        )
    )
    assert [v.traffic_weight for v in changed.experiment.variants] == [0.1, 0.9]
    assert changed.experiment.coverage == 0.5
    # adapters are kept when only weights change
    assert changed.experiment.variants[1].adapters[0].name == "support-v2"
    for uid in units:
        reply = await exp_stub.Assign(
            pb.AssignRequest(tenant=tenant, experiment_key="sticky", unit_id=uid)
        )
        assert reply.sticky and reply.variant.name == before[uid]

    bumped = await exp_stub.UpdateExperiment(
        pb.UpdateExperimentRequest(tenant=tenant, key="sticky", bump_bucket_version=True)
    )
    assert bumped.experiment.bucket_version == 2
    moved = 0
    for uid in units:
        reply = await exp_stub.Assign(
            pb.AssignRequest(tenant=tenant, experiment_key="sticky", unit_id=uid)
        )
        want = assignment.assign(uid, "sticky", 2, [0.1, 0.9], 0.5)
        assert reply.variant_index == want.variant_index and not reply.sticky
        assert reply.bucket_version == 2
        moved += reply.in_experiment and reply.variant.name != before[uid]
    assert moved > 0


async def test_tenant_cannot_see_or_assign_into_another_tenants_experiment(exp_stub, exp_redis):
    owner = await tenant_with_adapters(exp_redis)
    other = await tenant_with_adapters(exp_redis)
    await create(exp_stub, owner, key="private")
    await expect_error(
        exp_stub.GetExperiment(pb.GetExperimentRequest(tenant=other, key="private")),
        grpc.StatusCode.NOT_FOUND,
        "EXPERIMENT_NOT_FOUND",
    )
    await expect_error(
        exp_stub.Assign(pb.AssignRequest(tenant=other, experiment_key="private", unit_id="u")),
        grpc.StatusCode.NOT_FOUND,
        "EXPERIMENT_NOT_FOUND",
    )
    listed = await exp_stub.ListExperiments(pb.ListExperimentsRequest(tenant=other))
    assert not listed.experiments


async def test_shared_platform_adapter_is_allowed(exp_stub, exp_redis):
    tenant = await tenant_with_adapters(exp_redis)
    shared = f"shared-{new_tenant()}"
    await register_adapter(exp_redis, PLATFORM, shared)
    try:
        exp = await create(exp_stub, tenant, adapters=["support-v1", shared])
    finally:
        await unregister_adapter(exp_redis, PLATFORM, shared)
    assert exp.variants[1].adapters[0].name == shared


async def test_duplicate_key_is_already_exists(exp_stub, exp_redis):
    tenant = await tenant_with_adapters(exp_redis)
    await create(exp_stub, tenant, key="dup")
    await expect_error(
        create(exp_stub, tenant, key="dup"), grpc.StatusCode.ALREADY_EXISTS, "EXPERIMENT_EXISTS"
    )


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_CREATES = {
    "negative weight": (dict(weights=(1.2, -0.2)), INVALID, "INVALID_WEIGHTS"),
    "weights sum below 1": (dict(weights=(0.4, 0.4)), INVALID, "INVALID_WEIGHTS"),
    "weights sum above 1": (dict(weights=(0.6, 0.42)), INVALID, "INVALID_WEIGHTS"),
    "coverage above 1": (dict(coverage=1.5), INVALID, "INVALID_COVERAGE"),
    "coverage below 0": (dict(coverage=-0.1), INVALID, "INVALID_COVERAGE"),
    "one variant": (dict(weights=(1.0,)), INVALID, "TOO_FEW_VARIANTS"),
    "hash version 3": (dict(hash_version=3), INVALID, "INVALID_HASH_VERSION"),
    "unknown adapter": (
        dict(adapters=["support-v1", "nope"]),
        grpc.StatusCode.NOT_FOUND,
        "ADAPTER_NOT_FOUND",
    ),
    "bad key": (dict(key="Bad Key"), INVALID, "INVALID_EXPERIMENT_KEY"),
    "bad namespace": (
        dict(namespace=pb.Namespace(name="ns", range_start=0.6, range_end=0.2)),
        INVALID,
        "INVALID_NAMESPACE",
    ),
}


@pytest.mark.parametrize("case", BAD_CREATES, ids=list(BAD_CREATES))
async def test_bad_definitions_are_rejected(exp_stub, exp_redis, case):
    tenant = await tenant_with_adapters(exp_redis)
    kwargs, code, reason = BAD_CREATES[case]
    await expect_error(create(exp_stub, tenant, start=False, **kwargs), code, reason)
    listed = await exp_stub.ListExperiments(pb.ListExperimentsRequest(tenant=tenant))
    assert not listed.experiments  # nothing half-created


async def test_weights_within_tolerance_are_accepted(exp_stub, exp_redis):
    tenant = await tenant_with_adapters(exp_redis)
    exp = await create(exp_stub, tenant, weights=(0.5, 0.505))
    assert exp.status == pb.EXPERIMENT_STATUS_RUNNING


async def test_foreign_adapter_gets_the_same_not_found_as_an_unknown_one(exp_stub, exp_redis):
    owner = await tenant_with_adapters(exp_redis)
    await register_adapter(exp_redis, owner, "secret-adapter")
    other = await tenant_with_adapters(exp_redis)
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await create(exp_stub, other, adapters=["support-v1", "secret-adapter"])
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await create(exp_stub, other, adapters=["support-v1", "never-registered"])
    assert foreign.value.code() == unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(foreign.value) == error_reason(unknown.value) == "ADAPTER_NOT_FOUND"


async def test_bad_weight_update_is_rejected_and_leaves_the_experiment_unchanged(
    exp_stub, exp_redis
):
    tenant = await tenant_with_adapters(exp_redis)
    await create(exp_stub, tenant, key="upd")
    await expect_error(
        exp_stub.UpdateExperiment(
            pb.UpdateExperimentRequest(
                tenant=tenant,
                key="upd",
                update_mask=FieldMask(paths=["traffic_weights"]),
                experiment=pb.Experiment(
                    variants=[
                        pb.Variant(name="control", traffic_weight=0.9),
                        pb.Variant(name="treatment", traffic_weight=0.9),
                    ]
                ),
            )
        ),
        INVALID,
        "INVALID_WEIGHTS",
    )
    await expect_error(
        exp_stub.UpdateExperiment(
            pb.UpdateExperimentRequest(
                tenant=tenant,
                key="upd",
                update_mask=FieldMask(paths=["coverage"]),
                experiment=pb.Experiment(coverage=2.0),
            )
        ),
        INVALID,
        "INVALID_COVERAGE",
    )
    got = await exp_stub.GetExperiment(pb.GetExperimentRequest(tenant=tenant, key="upd"))
    assert [v.traffic_weight for v in got.experiment.variants] == [0.5, 0.5]
    assert got.experiment.coverage == 1.0


async def test_assign_bad_input(exp_stub, exp_redis):
    tenant = await tenant_with_adapters(exp_redis)
    await create(exp_stub, tenant, key="a")
    await expect_error(
        exp_stub.Assign(pb.AssignRequest(tenant=tenant, experiment_key="a", unit_id="")),
        INVALID,
        "EMPTY_UNIT_ID",
    )
    await expect_error(
        exp_stub.Assign(pb.AssignRequest(tenant=tenant, experiment_key="missing", unit_id="u")),
        grpc.StatusCode.NOT_FOUND,
        "EXPERIMENT_NOT_FOUND",
    )
    await expect_error(
        exp_stub.Assign(pb.AssignRequest(tenant="", experiment_key="a", unit_id="u")),
        INVALID,
        "INVALID_TENANT",
    )
