"""Hot-swap: the registry's serving pointer, history and rollback, HotSwap's checks, and the
SwapListener every replica runs, all against a real redis-server (no model needed)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.keys import PLATFORM
from services.common.localhost import free_port, start_redis_server
from services.inference.registry import (
    HISTORY_LIMIT,
    SWAP_CHANNEL,
    AdapterRecord,
    AdapterRegistry,
    SwapConflict,
)
from services.inference.store import WEIGHTS_FILE, AdapterFiles, AdapterStore
from services.inference.swap import HotSwap, SwapEvent, SwapListener

TENANT = "bank"
NAME = "support"


@pytest.fixture
def registry(redis_client: aioredis.Redis) -> AdapterRegistry:
    return AdapterRegistry(redis_client)


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def files(n: int) -> AdapterFiles:
    return AdapterFiles(config=b'{"r": 8}', weights=f"weights of version {n}".encode())


async def register(
    registry: AdapterRegistry,
    store: AdapterStore | None = None,
    n: int = 1,
    owner: str = TENANT,
    name: str = NAME,
    activate: bool = True,
) -> AdapterRecord:
    adapter = files(n)
    if store is not None:
        store.save(owner, name, adapter)
    record = AdapterRecord(
        owner=owner, name=name, version=0, sha256=adapter.sha256, rank=8, lora_alpha=16.0
    )
    return await registry.register(record, activate=activate)


async def serving(registry: AdapterRegistry, owner: str = TENANT, name: str = NAME) -> int:
    return (await registry.get(owner, name)).version


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Events:
    """Every SwapEvent published while the block runs, in publication order."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.events: list[SwapEvent] = []

    async def __aenter__(self) -> Events:
        await self.pubsub.subscribe(SWAP_CHANNEL)
        return self

    async def collect(self, count: int, timeout: float = 10.0) -> list[SwapEvent]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.events) < count and asyncio.get_running_loop().time() < deadline:
            message = await self.pubsub.get_message(timeout=0.1)
            if message is not None:
                self.events.append(SwapEvent.parse(message["data"]))
        return self.events

    async def __aexit__(self, *exc) -> None:
        await self.pubsub.aclose()


# -- registry: serving version, history, rollback ---------------------------------------------


async def test_registering_serves_the_new_version_and_remembers_the_old(registry):
    for n in (1, 2, 3):
        await register(registry, n=n)
    assert await serving(registry) == 3
    assert (await registry.resolve(TENANT, NAME)).version == 3
    assert await registry.history(TENANT, NAME) == [2, 1]


async def test_register_with_activate_false_waits_for_a_swap(registry):
    first = await register(registry, n=1, activate=False)
    assert first.version == 1 and await serving(registry) == 1  # nothing served: it must
    staged = await register(registry, n=2, activate=False)
    assert staged.version == 2
    assert await serving(registry) == 1
    assert await registry.history(TENANT, NAME) == []
    assert (await registry.resolve(TENANT, NAME, 2)).sha256 == files(2).sha256  # pinnable
    result = await registry.swap(TENANT, NAME, 2)
    assert (result.previous.version, result.current.version) == (1, 2)
    assert (await registry.resolve(TENANT, NAME)).version == 2


async def test_swap_serves_any_registered_version_and_lists_it(registry):
    for n in (1, 2, 3):
        await register(registry, n=n)
    result = await registry.swap(TENANT, NAME, 1)
    assert (result.previous.version, result.current.version) == (3, 1)
    assert result.current.sha256 == files(1).sha256
    assert result.previous.sha256 == files(3).sha256
    assert (await registry.resolve(TENANT, NAME)).version == 1
    listed, _ = await registry.list(TENANT)
    assert [(r.name, r.version) for r in listed] == [(NAME, 1)]
    assert await registry.history(TENANT, NAME) == [3, 2, 1]


async def test_swap_to_the_serving_version_changes_nothing(registry, redis_client):
    await register(registry, n=1)
    await register(registry, n=2)
    async with Events(redis_client) as events:
        result = await registry.swap(TENANT, NAME, 2)
        assert (result.previous.version, result.current.version) == (2, 2)
        assert await events.collect(1, timeout=0.3) == []
    assert await registry.history(TENANT, NAME) == [1]


async def test_rollback_is_one_call_and_walks_back_the_history(registry):
    for n in (1, 2, 3):
        await register(registry, n=n)
    await registry.swap(TENANT, NAME, 1)  # serving 3 -> 1; history [3, 2, 1]
    target = await registry.rollback_target(TENANT, NAME)
    result = await registry.rollback(TENANT, NAME, target.version)
    assert (result.previous.version, result.current.version) == (1, 3)
    assert await serving(registry) == 3
    assert await registry.history(TENANT, NAME) == [2, 1]
    for expected in (2, 1):
        await registry.rollback(
            TENANT, NAME, (await registry.rollback_target(TENANT, NAME)).version
        )
        assert await serving(registry) == expected
    with pytest.raises(FailedPrecondition) as info:
        await registry.rollback_target(TENANT, NAME)
    assert info.value.reason == "NO_PREVIOUS_VERSION"
    assert await serving(registry) == 1


async def test_rollback_refuses_a_version_that_is_no_longer_the_previous_one(registry):
    for n in (1, 2, 3):
        await register(registry, n=n)  # history [2, 1]
    with pytest.raises(SwapConflict):
        await registry.rollback(TENANT, NAME, 1)
    assert await serving(registry) == 3
    assert await registry.history(TENANT, NAME) == [2, 1]


async def test_history_keeps_only_the_last_versions(registry):
    for n in range(1, HISTORY_LIMIT + 5):
        await register(registry, n=n)
    history = await registry.history(TENANT, NAME)
    assert history == list(range(HISTORY_LIMIT + 3, 3, -1))
    assert len(history) == HISTORY_LIMIT


async def test_concurrent_swaps_never_interleave(registry, redis_client):
    """Each change reads the serving version and writes the next one in one script: the
    announced changes form a single chain (no two start from the same version), and the
    history is that chain backwards. A read-then-write outside Redis would break both."""
    for n in range(1, 7):
        await register(registry, n=n)
    rng = random.Random(7)
    targets = [rng.choice([v for v in range(1, 7) if v != t]) for t in range(60)]
    async with Events(redis_client) as events:
        results = await asyncio.gather(*(registry.swap(TENANT, NAME, v) for v in targets))
        changes = [r for r in results if r.previous.version != r.current.version]
        announced = await events.collect(len(changes))
    assert len(announced) == len(changes) > 30
    chain = [6] + [e.version for e in announced]
    assert [e.previous for e in announced] == chain[:-1]
    assert await serving(registry) == chain[-1]
    assert await registry.history(TENANT, NAME) == chain[-2::-1][:HISTORY_LIMIT]


async def test_swap_with_the_wrong_sha256_is_refused_and_nothing_changes(registry, redis_client):
    await register(registry, n=1)
    await register(registry, n=2)
    await registry.swap(TENANT, NAME, 1)
    async with Events(redis_client) as events:
        with pytest.raises(FailedPrecondition) as info:
            await registry.swap(TENANT, NAME, 2, expected_sha256="0" * 64)
        assert await events.collect(1, timeout=0.3) == []
    assert info.value.reason == "SHA256_MISMATCH"
    assert info.value.metadata["actual_sha256"] == files(2).sha256
    assert await serving(registry) == 1
    assert await registry.history(TENANT, NAME) == [2, 1]
    # The right sha256 (in any case) is accepted.
    result = await registry.swap(TENANT, NAME, 2, expected_sha256=files(2).sha256.upper())
    assert result.current.version == 2


@pytest.mark.parametrize("sha", ["abc", "g" * 64, "0" * 65])
async def test_malformed_expected_sha256_is_invalid(registry, sha):
    await register(registry, n=1)
    with pytest.raises(InvalidArgument) as info:
        await registry.swap(TENANT, NAME, 1, expected_sha256=sha)
    assert info.value.reason == "BAD_SHA256"


async def test_swap_to_an_unknown_version_or_adapter_is_not_found(registry):
    await register(registry, n=1)
    with pytest.raises(NotFound) as version:
        await registry.swap(TENANT, NAME, 9)
    assert version.value.reason == "ADAPTER_NOT_FOUND"
    assert str(version.value) == "adapter 'support' version 9 not found"
    with pytest.raises(NotFound):
        await registry.swap(TENANT, "nope", 1)
    with pytest.raises(NotFound):
        await registry.rollback_target(TENANT, "nope")
    with pytest.raises(InvalidArgument) as zero:
        await registry.swap(TENANT, NAME, 0)
    assert zero.value.reason == "BAD_VERSION"
    assert await serving(registry) == 1


async def test_a_tenant_cannot_swap_another_tenants_or_the_platforms_adapter(registry, store):
    await register(registry, n=1, owner="airline")
    await register(registry, n=2, owner="airline")
    await register(registry, n=1, owner=PLATFORM)
    await register(registry, n=2, owner=PLATFORM)
    hot = HotSwap(registry, store)
    for call in (
        hot.swap(TENANT, NAME, 1),
        hot.rollback(TENANT, NAME),
    ):
        with pytest.raises(NotFound) as info:
            await call
        # The same answer as for a name nobody has: existence does not leak.
        assert info.value.reason == "ADAPTER_NOT_FOUND"
    assert await serving(registry, "airline") == 2
    assert await serving(registry, PLATFORM) == 2


async def test_bad_owner_and_name_are_invalid(registry, store):
    hot = HotSwap(registry, store)
    cases = [
        (hot.swap("Bad/Tenant", NAME, 1), "INVALID_TENANT"),
        (hot.swap(TENANT, "../x", 1), "INVALID_ADAPTER_NAME"),
        (hot.swap(TENANT, NAME, 1, shared=True), "SHARED_WITH_TENANT"),
        (hot.rollback("", NAME), "INVALID_TENANT"),
        (hot.swap(TENANT, NAME, 0), "BAD_VERSION"),
    ]
    for call, reason in cases:
        with pytest.raises(InvalidArgument) as info:
            await call
        assert info.value.reason == reason


# -- HotSwap: the stored file is checked and warmed before the pointer moves -------------------


async def test_hot_swap_prefetches_before_the_flip(registry, store):
    await register(registry, store, n=1)
    await register(registry, store, n=2)
    await registry.swap(TENANT, NAME, 1)
    seen: list[tuple[int, int]] = []

    async def prefetch(record: AdapterRecord) -> None:
        seen.append((record.version, await serving(registry)))

    result = await HotSwap(registry, store, prefetch).swap(TENANT, NAME, 2)
    assert (result.previous.version, result.current.version) == (1, 2)
    assert seen == [(2, 1)]  # warmed while version 1 still served
    assert await serving(registry) == 2


async def test_hot_swap_of_a_shared_adapter(registry, store):
    await register(registry, store, n=1, owner=PLATFORM)
    await register(registry, store, n=2, owner=PLATFORM)
    result = await HotSwap(registry, store).swap("", NAME, 1, shared=True)
    assert result.current.shared and result.current.version == 1
    assert (await registry.resolve(TENANT, NAME)).version == 1
    back = await HotSwap(registry, store).rollback("", NAME, shared=True)
    assert back.current.version == 2


async def test_a_failing_prefetch_does_not_fail_the_swap(registry, store):
    await register(registry, store, n=1)
    await register(registry, store, n=2)

    async def prefetch(record: AdapterRecord) -> None:
        raise RuntimeError("cache on fire")

    result = await HotSwap(registry, store, prefetch).swap(TENANT, NAME, 1)
    assert result.current.version == 1 and await serving(registry) == 1


async def test_hot_swap_with_wrong_sha256_is_refused_before_loading(registry, store):
    await register(registry, store, n=1)
    await register(registry, store, n=2)
    loaded: list[int] = []

    async def prefetch(record: AdapterRecord) -> None:
        loaded.append(record.version)

    with pytest.raises(FailedPrecondition) as info:
        await HotSwap(registry, store, prefetch).swap(TENANT, NAME, 1, expected_sha256="f" * 64)
    assert info.value.reason == "SHA256_MISMATCH"
    assert loaded == [] and await serving(registry) == 2


@pytest.mark.parametrize("damage", ["tamper", "delete"])
async def test_hot_swap_to_a_damaged_stored_file_is_refused(registry, store, damage):
    await register(registry, store, n=1)
    v2 = await register(registry, store, n=2)
    await registry.swap(TENANT, NAME, 1)
    weights = store.root / TENANT / NAME / v2.sha256 / WEIGHTS_FILE
    if damage == "tamper":
        weights.write_bytes(b"not what was registered")
    else:
        weights.unlink()
    with pytest.raises(FailedPrecondition) as info:
        await HotSwap(registry, store).swap(TENANT, NAME, 2, expected_sha256=v2.sha256)
    assert info.value.reason == "ADAPTER_INTEGRITY_FAILED"
    cause = "SHA256_MISMATCH" if damage == "tamper" else "ADAPTER_FILES_MISSING"
    assert info.value.metadata["cause"] == cause
    assert await serving(registry) == 1
    assert await registry.history(TENANT, NAME) == [2, 1]


async def test_rollback_to_a_damaged_version_is_refused(registry, store):
    v1 = await register(registry, store, n=1)
    await register(registry, store, n=2)
    (store.root / TENANT / NAME / v1.sha256 / WEIGHTS_FILE).write_bytes(b"tampered")
    with pytest.raises(FailedPrecondition) as info:
        await HotSwap(registry, store).rollback(TENANT, NAME)
    assert info.value.reason == "ADAPTER_INTEGRITY_FAILED"
    assert await serving(registry) == 2
    assert await registry.history(TENANT, NAME) == [1]


async def test_hot_rollback_without_history_is_a_failed_precondition(registry, store):
    await register(registry, store, n=1)
    with pytest.raises(FailedPrecondition) as info:
        await HotSwap(registry, store).rollback(TENANT, NAME)
    assert info.value.reason == "NO_PREVIOUS_VERSION"


async def test_rollback_that_loses_a_race_looks_again(registry, store):
    for n in (1, 2, 3):
        await register(registry, store, n=n)  # serving 3, history [2, 1]
    raced = False

    async def prefetch(record: AdapterRecord) -> None:
        nonlocal raced
        if not raced:  # another replica swaps while this one checks version 2's file
            raced = True
            await registry.swap(TENANT, NAME, 1)  # serving 1, history [3, 2, 1]

    result = await HotSwap(registry, store, prefetch).rollback(TENANT, NAME)
    assert (result.previous.version, result.current.version) == (1, 3)
    assert await registry.history(TENANT, NAME) == [2, 1]


async def test_rollback_gives_up_when_the_adapter_keeps_changing(registry, store):
    for n in (1, 2):
        await register(registry, store, n=n)

    async def prefetch(record: AdapterRecord) -> None:  # someone swaps every time
        current = await serving(registry)
        await registry.swap(TENANT, NAME, 1 if current == 2 else 2)

    with pytest.raises(FailedPrecondition) as info:
        await HotSwap(registry, store, prefetch).rollback(TENANT, NAME)
    assert info.value.reason == "CONCURRENT_SWAP"


# -- SwapListener: every replica hears of every change -----------------------------------------


class Replica:
    """What a replica's core would plug into its listener, recorded."""

    def __init__(self) -> None:
        self.prefetched: list[tuple[str, str, int]] = []
        self.swaps: list[SwapEvent] = []
        self.resyncs = 0

    async def prefetch(self, record: AdapterRecord) -> None:
        self.prefetched.append(record.cache_key)

    def on_swap(self, event: SwapEvent) -> None:
        self.swaps.append(event)

    def on_reconnect(self) -> None:
        self.resyncs += 1


@pytest.fixture
async def replicas(
    redis_client: aioredis.Redis, registry: AdapterRegistry
) -> AsyncIterator[list[tuple[Replica, SwapListener]]]:
    pairs = []
    for _ in range(2):
        replica = Replica()
        listener = SwapListener(
            redis_client,
            registry,
            prefetch=replica.prefetch,
            on_swap=replica.on_swap,
            on_reconnect=replica.on_reconnect,
        )
        listener.start()
        await listener.wait_subscribed()
        pairs.append((replica, listener))
    yield pairs
    for _, listener in pairs:
        await listener.close()


async def test_every_replica_hears_of_a_swap_and_prefetches_it(registry, store, replicas):
    await register(registry, store, n=1)
    await register(registry, store, n=2)
    await HotSwap(registry, store).swap(TENANT, NAME, 1)
    for replica, listener in replicas:
        await eventually(lambda listener=listener: listener.events_handled == 3)
        assert [(e.kind, e.version, e.previous) for e in replica.swaps] == [
            ("register", 1, 0),
            ("register", 2, 1),
            ("swap", 1, 2),
        ]
        assert replica.swaps[-1].sha256 == files(1).sha256
        assert replica.swaps[-1].owner == TENANT and replica.swaps[-1].name == NAME
        # A new name is not prefetched (bulk uploads must not churn caches); a new version
        # of a serving adapter and a swap are.
        assert replica.prefetched == [(TENANT, NAME, 2), (TENANT, NAME, 1)]


async def test_a_listener_survives_bad_messages_and_failing_hooks(
    redis_client, registry, store, replicas
):
    (replica, listener), _ = replicas
    calls = 0

    async def broken_prefetch(record: AdapterRecord) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("prefetch failed")

    listener._prefetch = broken_prefetch
    await redis_client.publish(SWAP_CHANNEL, b"not json")
    await redis_client.publish(SWAP_CHANNEL, json.dumps({"owner": "x"}))
    phantom = {"owner": TENANT, "name": NAME, "version": 42, "sha256": "0" * 64, "previous": 1}
    await redis_client.publish(SWAP_CHANNEL, json.dumps(phantom))  # no such version
    await register(registry, store, n=1)
    await register(registry, store, n=2)  # prefetch raises
    await eventually(lambda: listener.events_handled == 3)
    assert listener.running
    assert calls == 1  # the phantom version was not prefetched
    assert [e.version for e in replica.swaps] == [42, 1, 2]
    listener._prefetch = replica.prefetch
    await registry.swap(TENANT, NAME, 1)
    await eventually(lambda: listener.events_handled == 4)
    assert replica.prefetched == [(TENANT, NAME, 1)]


async def test_a_listener_resubscribes_after_redis_restarts(tmp_path):
    port = free_port()
    proc = start_redis_server(port, str(tmp_path))
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    registry = AdapterRegistry(redis)
    replica = Replica()
    listener = SwapListener(
        redis,
        registry,
        on_swap=replica.on_swap,
        on_reconnect=replica.on_reconnect,
        max_retry_seconds=0.2,
    )
    try:
        listener.start()
        await listener.wait_subscribed()
        await register(registry, n=1)
        await eventually(lambda: listener.events_handled == 1)

        proc.kill()
        proc.wait(timeout=10)
        await asyncio.sleep(0.5)  # the listener notices and keeps retrying meanwhile
        assert listener.running
        proc = start_redis_server(port, str(tmp_path))

        await eventually(lambda: replica.resyncs >= 1)
        await redis.connection_pool.disconnect()  # the test's own pooled connections died
        # Redis came back empty (no persistence); a new registration is announced again.
        n = 2
        while not any(e.version == 1 and e.kind == "register" for e in replica.swaps[1:]):
            await redis.flushdb()
            await register(registry, n=n)
            n += 1
            await asyncio.sleep(0.05)
            assert n < 200, "no event received after the restart"
        assert listener.running and listener.reconnects == replica.resyncs >= 1
    finally:
        await listener.close()
        await redis.aclose()
        proc.kill()
        proc.wait(timeout=10)
