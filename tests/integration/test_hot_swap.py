"""Hot-swap over real gRPC with the real model, real adapters and real Redis: running
requests keep their version, new ones get the new one, nothing fails while swapping, one
call rolls back, and a version whose sha256 does not check out is refused."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.redis import connect
from services.inference.registry import AdapterRegistry
from services.inference.store import WEIGHTS_FILE
from services.inference.swap import SwapListener
from tests.helpers import error_reason, new_tenant, register

pytestmark = pytest.mark.integration

PROMPT = "Customer: Where is my order 4821?\nAgent:"
NAME = "support"


def generate(stub, tenant: str, version: int = 0, max_new_tokens: int = 8, **kw):
    return stub.Generate(
        pb.GenerateRequest(
            tenant=tenant,
            adapter=common_pb2.AdapterRef(name=kw.pop("name", NAME), version=version),
            prompt=PROMPT,
            params=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        )
    )


def swap(stub, tenant: str, version: int, name: str = NAME, **kw):
    return stub.SwapAdapter(pb.SwapAdapterRequest(tenant=tenant, name=name, version=version, **kw))


async def expect_error(call, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert error_reason(info.value) == reason
    return info.value


async def until(condition, timeout: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def serving_version(stub, tenant: str) -> int:
    return (await generate(stub, tenant, max_new_tokens=1)).adapter.version


async def test_a_running_request_finishes_on_its_version_and_new_ones_get_the_new_one(
    stub, inference, monkeypatch
):
    _, core = inference
    tenant = new_tenant()
    await register(stub, tenant, "retailer")
    await register(stub, tenant, "bank")
    await swap(stub, tenant, 1)
    long_tokens = 64  # greedy v1 stops by itself after ~50 tokens: long enough to swap under
    pinned_v1 = await generate(stub, tenant, version=1, max_new_tokens=long_tokens)
    pinned_v2 = await generate(stub, tenant, version=2)
    assert pinned_v1.usage.completion_tokens > 20
    assert pinned_v1.text[:40] != pinned_v2.text[:40]  # the two versions are told apart

    # Know when the long request has resolved its version (and so holds v1 for good).
    resolved = asyncio.Event()
    real_resolve = core.registry.resolve

    async def spy(t, name, version=0):
        record = await real_resolve(t, name, version)
        if t == tenant and version == 0:
            resolved.set()
        return record

    monkeypatch.setattr(core.registry, "resolve", spy)
    running = asyncio.ensure_future(generate(stub, tenant, max_new_tokens=long_tokens))
    await asyncio.wait_for(resolved.wait(), 30)
    monkeypatch.undo()

    reply = await swap(stub, tenant, 2)
    assert not running.done(), "the long request ended before the swap: make it longer"
    assert (reply.previous.version, reply.current.version) == (1, 2)
    after = await generate(stub, tenant)
    before = await running

    assert after.adapter.version == 2 and after.text == pinned_v2.text
    assert before.adapter.version == 1 and before.text == pinned_v1.text
    assert before.token_logprobs == pytest.approx(pinned_v1.token_logprobs, abs=1e-3)


async def test_no_request_fails_while_the_version_is_swapped_under_load(stub):
    tenant = new_tenant()
    versions = 10
    for n in range(versions):
        await register(stub, tenant, ("retailer", "bank")[n % 2])
    await swap(stub, tenant, 1)
    floor = 1  # every request started after swap k returned must get version >= k
    done = False
    replies: list[tuple[int, int]] = []  # (floor at start, version served)

    async def client() -> None:
        while not done:
            start = floor
            reply = await generate(stub, tenant, max_new_tokens=4)
            replies.append((start, reply.adapter.version))

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        for version in range(2, versions + 2):
            # A few requests complete between swaps, so requests and swaps interleave.
            mark = len(replies) + 3
            await until(lambda mark=mark: len(replies) >= mark)
            if version > versions:
                break
            reply = await swap(stub, tenant, version)
            assert reply.previous.version == version - 1
            floor = version
    finally:
        done = True
        await asyncio.gather(*clients)  # re-raises any failed request
    assert len(replies) >= 3 * versions
    assert all(served >= start for start, served in replies), replies
    assert {v for _, v in replies} > {1, versions}
    assert await serving_version(stub, tenant) == versions


async def test_a_swap_warms_the_new_version_before_traffic(stub):
    tenant = new_tenant()
    await register(stub, tenant, "retailer")
    await register(stub, tenant, "bank")
    await swap(stub, tenant, 1)

    stats = await stub.CacheStats(pb.CacheStatsRequest())
    cached = {(a.tenant, a.name, a.version) for a in stats.adapters}
    assert (tenant, NAME, 1) in cached  # loaded by the swap, no request has used it


async def test_rollback_is_one_call(stub):
    tenant = new_tenant()
    v1 = await register(stub, tenant, "retailer")
    v2 = await register(stub, tenant, "bank")
    assert await serving_version(stub, tenant) == 2

    reply = await stub.RollbackAdapter(pb.RollbackAdapterRequest(tenant=tenant, name=NAME))

    assert (reply.previous.version, reply.current.version) == (2, 1)
    assert (reply.previous.sha256, reply.current.sha256) == (v2.sha256, v1.sha256)
    assert reply.current.tenant == tenant and reply.swapped_at.seconds > 0
    assert await serving_version(stub, tenant) == 1
    await expect_error(
        stub.RollbackAdapter(pb.RollbackAdapterRequest(tenant=tenant, name=NAME)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_PREVIOUS_VERSION",
    )
    assert await serving_version(stub, tenant) == 1


async def test_a_wrong_sha256_is_refused_and_the_old_version_keeps_serving(stub):
    tenant = new_tenant()
    await register(stub, tenant, "retailer")
    v2 = await register(stub, tenant, "bank")
    await swap(stub, tenant, 1)

    err = await expect_error(
        swap(stub, tenant, 2, expected_sha256="0" * 64),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SHA256_MISMATCH",
    )
    assert v2.sha256 in err.details()
    assert await serving_version(stub, tenant) == 1
    # The right one swaps.
    reply = await swap(stub, tenant, 2, expected_sha256=v2.sha256)
    assert reply.current.version == 2


async def test_a_tampered_stored_file_is_refused_and_the_old_version_keeps_serving(stub, inference):
    _, core = inference
    tenant = new_tenant()
    await register(stub, tenant, "retailer")
    v2 = await register(stub, tenant, "airline")
    await swap(stub, tenant, 1)
    weights = core.store.root / tenant / NAME / v2.sha256 / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")

    await expect_error(
        swap(stub, tenant, 2, expected_sha256=v2.sha256),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ADAPTER_INTEGRITY_FAILED",
    )
    assert await serving_version(stub, tenant) == 1


async def test_swap_errors(stub):
    tenant, other = new_tenant(), new_tenant()
    await register(stub, tenant, "retailer")
    await register(stub, other, "bank", name="private")
    NF, BAD = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(swap(stub, tenant, 7), NF, "ADAPTER_NOT_FOUND")
    await expect_error(swap(stub, tenant, 1, name="nope"), NF, "ADAPTER_NOT_FOUND")
    # Another tenant's adapter answers exactly like a missing one.
    foreign = await expect_error(swap(stub, tenant, 1, name="private"), NF, "ADAPTER_NOT_FOUND")
    missing = await expect_error(swap(stub, tenant, 1, name="absent"), NF, "ADAPTER_NOT_FOUND")
    assert foreign.details().replace("private", "X") == missing.details().replace("absent", "X")
    await expect_error(
        stub.RollbackAdapter(pb.RollbackAdapterRequest(tenant=tenant, name="private")),
        NF,
        "ADAPTER_NOT_FOUND",
    )
    await expect_error(swap(stub, tenant, 0), BAD, "BAD_VERSION")
    await expect_error(swap(stub, tenant, 1, expected_sha256="xyz"), BAD, "BAD_SHA256")
    await expect_error(swap(stub, "", 1), BAD, "INVALID_TENANT")
    await expect_error(swap(stub, tenant, 1, name="../x"), BAD, "INVALID_ADAPTER_NAME")
    await expect_error(swap(stub, tenant, 1, shared=True), BAD, "SHARED_WITH_TENANT")


async def test_platform_adapters_swap_only_as_shared(stub):
    tenant = new_tenant()
    name = f"shared-{uuid.uuid4().hex[:8]}"
    await register(stub, "", "retailer", name=name, shared=True)
    await register(stub, "", "bank", name=name, shared=True)
    # A tenant can use the platform's adapter but not swap it.
    await expect_error(
        swap(stub, tenant, 1, name=name), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"
    )
    assert (await generate(stub, tenant, max_new_tokens=1, name=name)).adapter.version == 2

    reply = await swap(stub, "", 1, name=name, shared=True)
    assert reply.current.shared and reply.current.version == 1
    assert (await generate(stub, tenant, max_new_tokens=1, name=name)).adapter.version == 1


async def test_a_swap_made_elsewhere_warms_this_replica_through_its_listener(
    stub, inference, redis_url
):
    """The listener wired as docs say core should wire it: another replica's swap (here the
    registry used directly, as a replica without this one's cache) reaches this replica's
    cache before any request here asks for the new version."""
    _, core = inference
    redis = connect(redis_url)
    listener = SwapListener(
        redis,
        core.registry,
        prefetch=lambda r: core.cache.ensure(r.cache_key, lambda: core._load_weights(r)),
    )
    listener.start()
    try:
        await listener.wait_subscribed()
        tenant = new_tenant()
        await register(stub, tenant, "retailer")
        await register(stub, tenant, "bank")  # replaced a serving version: prefetched
        await until(lambda: listener.events_handled == 2)
        elsewhere = AdapterRegistry(redis)
        await elsewhere.swap(tenant, NAME, 1)
        await until(lambda: listener.events_handled == 3)
        stats = await stub.CacheStats(pb.CacheStatsRequest())
        cached = {(a.tenant, a.name, a.version) for a in stats.adapters}
        assert {(tenant, NAME, 1), (tenant, NAME, 2)} <= cached
    finally:
        listener.stop()
        await asyncio.sleep(0)
        await redis.aclose()
