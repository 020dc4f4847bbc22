"""The client library (assignment in the caller's process, as the gateway does it) against
the real service: a real gRPC server on the session's real Redis. Both must give every unit
the same variant, share stickiness and call counts, and the client must follow definition
changes made through the service without a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from experiments_testlib import new_tenant, register_adapter
from google.protobuf.field_mask_pb2 import FieldMask

from loraplex.experiments.v1 import experiments_service_pb2 as pb
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.experiments import assignment
from services.experiments.client import ExperimentsClient
from services.experiments.keys import experiment_key
from services.experiments.model import Experiment, Status
from tests.helpers import eventually, kill_pubsub_connections

pytestmark = pytest.mark.integration

# An hour: whatever change the client sees within a test reached it over pub/sub.
CACHE_SECONDS = 3600.0
UNITS = [f"user-{i}" for i in range(200)]


@pytest.fixture
async def client(exp_redis) -> AsyncIterator[ExperimentsClient]:
    client = ExperimentsClient(exp_redis, cache_seconds=CACHE_SECONDS)
    client.start()
    await client.wait_listening()
    yield client
    await client.close()


async def running(exp_stub, exp_redis, key: str = "sdk", **definition) -> str:
    tenant = new_tenant()
    await register_adapter(exp_redis, tenant, "support-v1")
    await register_adapter(exp_redis, tenant, "support-v2")
    weights = definition.pop("weights", (0.5, 0.5))
    variants = [
        pb.Variant(
            name=name, traffic_weight=w, adapters=[pb.VariantAdapter(name=f"support-v{i + 1}")]
        )
        for i, (name, w) in enumerate(zip(("control", "treatment"), weights, strict=True))
    ]
    experiment = pb.Experiment(key=key, variants=variants, **definition)
    await exp_stub.CreateExperiment(
        pb.CreateExperimentRequest(tenant=tenant, experiment=experiment)
    )
    await update(exp_stub, tenant, key, action=pb.EXPERIMENT_ACTION_START)
    return tenant


async def update(exp_stub, tenant: str, key: str, **change) -> pb.Experiment:
    request = pb.UpdateExperimentRequest(tenant=tenant, key=key, **change)
    return (await exp_stub.UpdateExperiment(request)).experiment


async def rpc_assign(exp_stub, tenant: str, key: str, unit: str) -> pb.AssignResponse:
    return await exp_stub.Assign(pb.AssignRequest(tenant=tenant, experiment_key=key, unit_id=unit))


async def test_client_and_assign_agree_with_growthbook_and_share_stickiness(
    client, exp_stub, exp_redis
):
    namespace = pb.Namespace(name="support", range_start=0.1, range_end=0.8)
    tenant = await running(
        exp_stub, exp_redis, weights=(0.3, 0.7), coverage=0.7, hash_seed="s", namespace=namespace
    )
    seen = {"excluded": 0, "control": 0, "treatment": 0}
    for i, unit in enumerate(UNITS):
        want = assignment.assign(unit, "s", 2, [0.3, 0.7], 0.7, ("support", 0.1, 0.8))
        # Half the units meet the client first, half the service: the other one must
        # find the unit's assignment already stored.
        if i % 2:
            mine = await client.assign(tenant, "sdk", unit)
            theirs = await rpc_assign(exp_stub, tenant, "sdk", unit)
            assert not mine.sticky and theirs.sticky == mine.in_experiment
        else:
            theirs = await rpc_assign(exp_stub, tenant, "sdk", unit)
            mine = await client.assign(tenant, "sdk", unit)
            assert not theirs.sticky and mine.sticky == theirs.in_experiment
        assert mine.variant_index == theirs.variant_index == want.variant_index
        assert mine.bucket == pytest.approx(theirs.bucket) and theirs.bucket == want.bucket
        # Both name the variant that serves: the control for a unit left out.
        assert mine.serving.name == theirs.variant.name
        seen["excluded" if not mine.in_experiment else mine.serving.name] += 1
    assert all(seen.values()), seen
    results = await exp_stub.GetResults(pb.GetResultsRequest(tenant=tenant, key="sdk"))
    # Every unit in the experiment counted once, and every call to either counted.
    assert sum(results.units_per_variant) == seen["control"] + seen["treatment"]
    assert list(results.assignments_per_variant) == [2 * n for n in results.units_per_variant]


async def test_an_excluded_unit_is_served_the_control_never_the_treatment(
    client, exp_stub, exp_redis
):
    tenant = await running(exp_stub, exp_redis, coverage=0.4)
    # Left out by coverage although its hash falls in the treatment's half: a router that
    # ignored coverage would send it to the treatment.
    unit = next(
        u
        for u in UNITS
        if not assignment.assign(u, "sdk", 2, [0.5, 0.5], 0.4).in_experiment
        and assignment.gb_hash("sdk", u, 2) >= 0.5
    )
    reply = await rpc_assign(exp_stub, tenant, "sdk", unit)
    assert not reply.in_experiment and reply.variant_index == -1
    assert reply.variant.name == "control" and reply.variant.adapters[0].name == "support-v1"
    mine = await client.assign(tenant, "sdk", unit)
    assert not mine.in_experiment and mine.serving.name == "control"


def client_sees(client: ExperimentsClient, tenant: str, predicate: Callable[[Experiment], bool]):
    """A check of the definition the client assigns with now."""

    async def check() -> bool:
        return predicate((await client.plan(tenant, "sdk")).experiment)

    return check


async def test_stop_and_weight_changes_reach_the_client_without_a_restart(
    client, exp_stub, exp_redis
):
    tenant = await running(exp_stub, exp_redis)
    first = {u: (await client.assign(tenant, "sdk", u)).variant_index for u in UNITS[:50]}
    assert set(first.values()) == {0, 1}

    everyone_to_treatment = [
        pb.Variant(name="control", traffic_weight=0.0),
        pb.Variant(name="treatment", traffic_weight=1.0),
    ]
    await update(
        exp_stub,
        tenant,
        "sdk",
        update_mask=FieldMask(paths=["traffic_weights"]),
        experiment=pb.Experiment(variants=everyone_to_treatment),
    )
    assert await eventually(client_sees(client, tenant, lambda exp: exp.weights == [0.0, 1.0]))
    for unit, index in first.items():  # assigned units keep their variant (sticky)
        got = await client.assign(tenant, "sdk", unit)
        assert got.sticky and got.variant_index == index
    for unit in UNITS[50:100]:  # new ones get the new weights
        assert (await client.assign(tenant, "sdk", unit)).variant_index == 1

    # A bucket-version bump re-randomises everyone with the current weights.
    await update(exp_stub, tenant, "sdk", bump_bucket_version=True)
    assert await eventually(client_sees(client, tenant, lambda exp: exp.bucket_version == 2))
    for unit in UNITS[:50]:
        got = await client.assign(tenant, "sdk", unit)
        assert got.variant_index == 1 and not got.sticky

    await update(exp_stub, tenant, "sdk", action=pb.EXPERIMENT_ACTION_STOP)
    assert await eventually(client_sees(client, tenant, lambda exp: exp.status == Status.STOPPED))
    with pytest.raises(FailedPrecondition) as err:
        await client.assign(tenant, "sdk", UNITS[0])
    assert err.value.reason == "EXPERIMENT_NOT_RUNNING"


async def test_a_start_reaches_a_client_that_had_seen_the_draft(client, exp_stub, exp_redis):
    tenant = new_tenant()
    await register_adapter(exp_redis, tenant, "support-v1")
    variants = [
        pb.Variant(name=n, traffic_weight=0.5, adapters=[pb.VariantAdapter(name="support-v1")])
        for n in ("control", "treatment")
    ]
    await exp_stub.CreateExperiment(
        pb.CreateExperimentRequest(
            tenant=tenant, experiment=pb.Experiment(key="draft", variants=variants)
        )
    )
    with pytest.raises(FailedPrecondition):
        await client.assign(tenant, "draft", "u1")  # the draft is now cached
    await update(exp_stub, tenant, "draft", action=pb.EXPERIMENT_ACTION_START)

    async def assigned() -> bool:
        try:
            return (await client.assign(tenant, "draft", "u1")).in_experiment
        except FailedPrecondition:
            return False

    assert await eventually(assigned)


async def test_a_change_missed_while_unsubscribed_is_picked_up_after_resubscribing(
    client, exp_stub, exp_redis
):
    tenant = await running(exp_stub, exp_redis)
    assert (await client.assign(tenant, "sdk", "u1")).in_experiment  # cached, running
    # A write nobody announced (as if its message were lost while the client was away),
    # then the client's subscription drops and comes back.
    stored = (await exp_redis.get(experiment_key(tenant, "sdk"))).decode()
    await exp_redis.set(
        experiment_key(tenant, "sdk"), stored.replace('"status": "running"', '"status": "stopped"')
    )
    reconnects = client._listener.reconnects
    await kill_pubsub_connections(exp_redis)
    assert await eventually(lambda: client._listener.reconnects > reconnects)
    with pytest.raises(FailedPrecondition):
        await client.assign(tenant, "sdk", "u1")


async def test_tenants_and_bad_input(client, exp_stub, exp_redis):
    owner = await running(exp_stub, exp_redis)
    other = new_tenant()
    with pytest.raises(NotFound) as err:
        await client.assign(other, "sdk", "u1")  # another tenant's experiment: not found
    assert err.value.reason == "EXPERIMENT_NOT_FOUND"
    for tenant, key, unit, reason in [
        (owner, "sdk", "", "EMPTY_UNIT_ID"),
        (owner, "sdk", "u" * 257, "UNIT_ID_TOO_LONG"),
        (owner, "Bad Key", "u1", "INVALID_EXPERIMENT_KEY"),
        ("", "sdk", "u1", "INVALID_TENANT"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            await client.assign(tenant, key, unit)
        assert err.value.reason == reason


async def test_sticky_writes_survive_a_script_flush_alone_and_in_a_burst(
    client, exp_stub, exp_redis
):
    tenant = await running(exp_stub, exp_redis)
    for burst in (1, 300):  # one call is sent alone; a burst goes as one pipeline
        await exp_redis.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
        units = [f"flush-{burst}-{i}" for i in range(burst)]
        got = await asyncio.gather(*(client.assign(tenant, "sdk", u) for u in units))
        want = [assignment.assign(u, "sdk", 2, [0.5, 0.5]).variant_index for u in units]
        assert [a.variant_index for a in got] == want and not any(a.sticky for a in got)
    results = await exp_stub.GetResults(pb.GetResultsRequest(tenant=tenant, key="sdk"))
    assert sum(results.units_per_variant) == 301  # each stored once
