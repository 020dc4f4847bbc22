"""The domain store directly (no gRPC): definition caching across replicas, batched
sticky writes under concurrency."""

from __future__ import annotations

import asyncio

import pytest
from experiments_testlib import new_tenant, register_adapter

from services.common.errors import FailedPrecondition
from services.experiments import assignment
from services.experiments.core import ExperimentStore, Update
from services.experiments.model import Experiment, Variant, VariantAdapter

pytestmark = pytest.mark.integration


async def running(store: ExperimentStore, redis, weights=(0.5, 0.5)) -> str:
    tenant = new_tenant()
    await register_adapter(redis, tenant, "a")
    variants = tuple(Variant(f"v{i}", (VariantAdapter("a"),), w) for i, w in enumerate(weights))
    await store.create(Experiment("e", tenant, variants))
    await store.update(tenant, "e", Update(action="start"))
    return tenant


async def test_a_stop_by_another_replica_takes_effect_within_the_cache_time(exp_redis):
    replica_a = ExperimentStore(exp_redis, definition_cache_seconds=0.3)
    replica_b = ExperimentStore(exp_redis, definition_cache_seconds=0.3)
    tenant = await running(replica_a, exp_redis)
    await replica_a.assign(tenant, "e", "u1")  # caches the running definition
    await replica_b.update(tenant, "e", Update(action="stop"))
    with pytest.raises(FailedPrecondition):
        await replica_b.assign(tenant, "e", "u1")  # its own change: at once
    await asyncio.sleep(0.35)
    with pytest.raises(FailedPrecondition):
        await replica_a.assign(tenant, "e", "u1")  # the other replica: after the cache time


async def test_concurrent_assigns_are_batched_correctly_and_count_each_unit_once(exp_redis):
    store = ExperimentStore(exp_redis)
    tenant = await running(store, exp_redis, (0.3, 0.7))
    units = [f"user-{i}" for i in range(500)]
    first = await asyncio.gather(*(store.assign(tenant, "e", u) for u in units))
    again = await asyncio.gather(*(store.assign(tenant, "e", u) for u in units))
    for unit, a, b in zip(units, first, again, strict=True):
        want = assignment.assign(unit, "e", 2, [0.3, 0.7]).variant_index
        assert a.variant_index == b.variant_index == want
        assert not a.sticky and b.sticky
    exp = await store.get(tenant, "e")
    counts = await store.units_per_variant(exp)
    assert sum(counts) == len(units)
    assert counts == [sum(a.variant_index == i for a in first) for i in (0, 1)]
