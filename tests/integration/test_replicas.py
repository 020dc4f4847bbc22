"""Two real inference replicas (the real model, real adapters, one real Redis, one adapter
store) behind the gateway's router: an adapter's requests stay on one replica (its cache
says so), a hot-swap reaches both, pinning reaches both, and when a replica stops, its
requests are retried on the other."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from gateway.replicas import InferenceReplicas, ReplicaSource
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.channels import open_channel
from services.common.redis import connect
from services.common.server import Server
from services.inference.app import create_server
from services.inference.settings import InferenceSettings
from tests.helpers import eventually, new_tenant, register

pytestmark = pytest.mark.integration

PROMPT = "Customer: Where is my order 4821?\nAgent:"


async def start_replica(redis_url: str, store) -> tuple[Server, object, object]:
    settings = InferenceSettings(
        port=0, redis_url=redis_url, adapter_store_dir=store, shutdown_grace_seconds=0.5
    )
    redis = connect(redis_url)
    server, core = create_server(settings, redis)
    await server.start()
    await core.start()
    await server.set_ready()
    return server, core, redis


@pytest.fixture
async def replicas(redis_url: str, tmp_path) -> AsyncIterator[list[tuple[Server, object]]]:
    started = [await start_replica(redis_url, tmp_path / "store") for _ in range(2)]
    yield [(server, core) for server, core, _ in started]
    for server, core, redis in started:
        await server.stop()
        core.close()
        await redis.aclose()


@pytest.fixture
async def router(replicas) -> AsyncIterator[InferenceReplicas]:
    addresses = tuple(f"127.0.0.1:{server.port}" for server, _ in replicas)
    router = InferenceReplicas(
        ReplicaSource(addresses=addresses), open_channel=open_channel, probe_seconds=0.2
    )
    await router.start()
    yield router
    await router.close()


def request(tenant: str, name: str, version: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name=name, version=version),
        prompt=PROMPT,
        params=pb.SamplingParams(max_new_tokens=2, temperature=0.0),
    )


async def cached_on(replicas, tenant: str) -> dict[int, dict[str, int]]:
    """Per replica (by port): the tenant's cached adapters and their hits, from the
    replica's own CacheStats."""
    out = {}
    for server, _ in replicas:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stats = await pb_grpc.InferenceServiceStub(channel).CacheStats(pb.CacheStatsRequest())
        out[server.port] = {a.name: a.hits for a in stats.adapters if a.tenant == tenant}
    return out


async def test_an_adapter_s_requests_stay_on_one_replica(replicas, router) -> None:
    tenant = new_tenant()
    names = [f"support-{i}" for i in range(15)]
    for name, demo in zip(names, ["retailer", "bank", "airline"] * 5, strict=True):
        await register(router, tenant, demo, name=name)
    for _ in range(3):
        for name in names:
            reply = await router.Generate(request(tenant, name))
            assert reply.adapter.name == name
    cached = await cached_on(replicas, tenant)
    for name in names:
        holders = [port for port, adapters in cached.items() if name in adapters]
        assert len(holders) == 1, (name, cached)  # loaded once, on one replica
        assert cached[holders[0]][name] == 2  # and hit by the two requests after the first
    assert all(cached.values()), cached  # spread over both (all 15 on one: p = 2^-14)


async def test_a_hot_swap_and_a_pin_reach_both_replicas(replicas, router) -> None:
    tenant = new_tenant()
    await register(router, tenant, "retailer")
    await register(router, tenant, "bank")  # version 2
    await router.SwapAdapter(pb.SwapAdapterRequest(tenant=tenant, name="support", version=1))
    stubs = []
    for server, _ in replicas:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stubs.append((channel, pb_grpc.InferenceServiceStub(channel)))
    try:
        for _, stub in stubs:  # both replicas serve (and cache) version 1
            assert (await stub.Generate(request(tenant, "support"))).adapter.version == 1
        await router.SwapAdapter(pb.SwapAdapterRequest(tenant=tenant, name="support", version=2))
        for _, stub in stubs:

            async def serving(stub=stub) -> bool:
                reply = await stub.Generate(request(tenant, "support"))
                return reply.adapter.version == 2

            assert await eventually(serving), "a replica still serves version 1"

        load = pb.LoadAdapterRequest(
            tenant=tenant, adapter=common_pb2.AdapterRef(name="support", version=2), pin=True
        )
        await router.LoadAdapter(load)
        for _, stub in stubs:
            stats = await stub.CacheStats(pb.CacheStatsRequest())
            host = next(t for t in stats.tiers if t.tier == "host")
            assert host.pinned == 1
    finally:
        for channel, _ in stubs:
            await channel.close()


async def test_a_stopped_replica_s_requests_go_to_the_other(replicas, router) -> None:
    tenant = new_tenant()
    names = [f"support-{i}" for i in range(6)]
    for name in names:
        await register(router, tenant, "retailer", name=name)
    for name in names:  # each on its own replica
        await router.Generate(request(tenant, name))
    before = await cached_on(replicas, tenant)
    # Stop the replica that holds more of them (at least 3 of the 6).
    (stopped, _), (survivor, _) = sorted(replicas, key=lambda r: -len(before[r[0].port]))
    moved = sorted(before[stopped.port])
    assert len(moved) >= 3, before
    await stopped.grpc.stop(None)

    for name in names:  # every request succeeds: the stopped replica's are retried
        assert (await router.Generate(request(tenant, name))).adapter.name == name
    stream = [m async for m in router.GenerateStream(request(tenant, moved[0]))]
    assert stream[-1].final.adapter.name == moved[0]
    after = await cached_on([r for r in replicas if r[0] is survivor], tenant)
    assert set(after[survivor.port]) == set(names)
    assert [r.address for r in router.live()] == [f"127.0.0.1:{survivor.port}"]
