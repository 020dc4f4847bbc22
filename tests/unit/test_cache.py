from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.errors import ResourceExhausted
from services.inference.cache import AdapterCache, TieredAdapterCache
from services.inference.lora import LoraModule, LoraWeights


def weights(num_floats: int) -> LoraWeights:
    """An adapter whose tensors take exactly 4 * num_floats bytes."""
    module = LoraModule(a=torch.zeros(1, num_floats - 1), b=torch.zeros(1, 1), scaling=1.0)
    return LoraWeights(modules={"m": module}, rank=1, lora_alpha=1.0)


def loader(num_floats: int, calls: list | None = None):
    async def load():
        if calls is not None:
            calls.append(num_floats)
        await asyncio.sleep(0)
        return weights(num_floats)

    return load


async def test_capacity_is_in_bytes_and_lru_is_evicted_first():
    cache = AdapterCache(capacity_bytes=4 * 250)
    for key in ("a", "b"):
        assert not await cache.ensure(key, loader(100))
    assert await cache.ensure("a", loader(100))  # hit: "a" becomes most recent
    await cache.ensure("c", loader(100))  # 300 floats > 250: evicts "b", the LRU
    assert "a" in cache and "c" in cache and "b" not in cache
    snap = cache.snapshot()
    assert (snap.hits, snap.misses, snap.evictions) == (1, 3, 1)
    assert snap.used_bytes == 800 and snap.entries == 2
    assert [key for key, _, _ in snap.adapters] == ["c", "a"]


async def test_adapter_in_use_is_never_evicted():
    cache = AdapterCache(capacity_bytes=4 * 150)
    async with cache.use("busy", loader(100)) as w:
        with pytest.raises(ResourceExhausted) as info:
            await cache.ensure("other", loader(100))
        assert info.value.reason == "ADAPTER_CACHE_FULL"
        assert "busy" in cache and w.size_bytes == 400
    await cache.ensure("other", loader(100))  # released: now it can go
    assert "busy" not in cache


async def test_adapter_larger_than_the_cache_is_refused():
    cache = AdapterCache(capacity_bytes=100)
    with pytest.raises(ResourceExhausted) as info:
        await cache.ensure("big", loader(100))
    assert info.value.reason == "ADAPTER_TOO_LARGE"
    assert cache.snapshot().entries == 0


async def test_concurrent_misses_share_one_load():
    cache = AdapterCache(capacity_bytes=10_000)
    calls: list[int] = []
    results = await asyncio.gather(*(cache.ensure("k", loader(10, calls)) for _ in range(5)))
    assert calls == [10]
    assert results.count(False) == 5 and cache.snapshot().misses == 1


async def test_failed_load_is_not_cached_and_can_be_retried():
    cache = AdapterCache(capacity_bytes=10_000)

    async def broken():
        raise ValueError("disk error")

    with pytest.raises(ValueError):
        await cache.ensure("k", broken)
    assert "k" not in cache
    assert not await cache.ensure("k", loader(10))


async def test_remove_skips_adapters_in_use():
    cache = AdapterCache(capacity_bytes=10_000)
    async with cache.use("k", loader(10)):
        assert not cache.remove("k")
    assert cache.remove("k") and cache.snapshot().used_bytes == 0


async def test_pinned_adapter_survives_lru_pressure_until_unpinned():
    cache = AdapterCache(capacity_bytes=4 * 250)
    await cache.ensure("keep", loader(100))
    assert cache.pin("keep")
    for key in ("b", "c", "d"):
        await cache.ensure(key, loader(100))
    assert "keep" in cache and cache.snapshot().pinned == 1
    cache.pin("keep", False)
    await cache.ensure("e", loader(100))
    assert "keep" not in cache
    assert not cache.pin("never-loaded")


async def test_idle_adapters_expire_after_the_ttl(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("services.inference.cache.time.monotonic", lambda: now[0])
    cache = AdapterCache(capacity_bytes=10_000, ttl_seconds=60)
    await cache.ensure("old", loader(10))
    await cache.ensure("pinned", loader(10))
    cache.pin("pinned")
    now[0] += 30
    await cache.ensure("fresh", loader(10))
    async with cache.use("busy", loader(10)):
        now[0] += 45  # "old" idle 75 s, "fresh" 45 s, "busy" in use
        await cache.ensure("fresh", loader(10))
        assert "old" not in cache
        assert {"pinned", "fresh", "busy"} <= set(k for k, _, _ in cache.snapshot().adapters)
        now[0] += 100
        cache.expire()
        assert "busy" in cache and "pinned" in cache and "fresh" not in cache
    snap = cache.snapshot()
    assert snap.expirations == 2 and snap.ttl_seconds == 60


def device_copy(weights: LoraWeights) -> LoraWeights:
    """Stands in for a copy to GPU memory: a new object with new tensors."""
    return LoraWeights(
        {k: LoraModule(m.a.clone(), m.b.clone(), m.scaling) for k, m in weights.modules.items()},
        weights.rank,
        weights.lora_alpha,
    )


async def test_device_tier_fills_from_the_host_tier_and_counts_per_tier():
    host = AdapterCache(capacity_bytes=4 * 1000, tier="host")
    device = AdapterCache(capacity_bytes=4 * 250, tier="device")
    cache = TieredAdapterCache(host, device, device_copy)
    calls: list[int] = []
    for key in ("a", "b", "c"):  # the device tier holds two of these, the host all three
        async with cache.use(key, loader(100, calls)) as w:
            assert w.size_bytes == 400
    assert calls == [100, 100, 100]
    assert "a" not in device and "a" in host
    async with cache.use("a", loader(100, calls)):  # device miss, host hit: no new load
        pass
    assert calls == [100, 100, 100]
    device_snap, host_snap = cache.snapshot()
    assert (device_snap.tier, host_snap.tier) == ("device", "host")
    assert (device_snap.misses, device_snap.evictions, device_snap.entries) == (4, 2, 2)
    assert (host_snap.misses, host_snap.hits, host_snap.entries) == (3, 1, 3)


async def test_device_tier_never_evicts_what_a_running_request_uses():
    cache = TieredAdapterCache(
        AdapterCache(4 * 1000), AdapterCache(4 * 150, tier="device"), device_copy
    )
    async with cache.use("running", loader(100)):
        with pytest.raises(ResourceExhausted) as info:
            await cache.ensure("other", loader(100))
        assert info.value.reason == "ADAPTER_CACHE_FULL"
        assert "running" in cache.device
    assert await cache.ensure("other", loader(100)) is False
    assert cache.remove("other") and "other" not in cache


async def test_a_tenant_past_its_share_evicts_its_own_adapters_never_anothers():
    cache = AdapterCache(capacity_bytes=4 * 1000, tenant_share=0.5)  # 500 floats each
    await cache.ensure(("quiet", "a", 1), loader(200))
    await cache.ensure(("quiet", "b", 1), loader(200))
    for version in range(1, 8):  # a tenant cycling through adapters
        await cache.ensure(("flood", "x", version), loader(200))
    # The flood stays within 500 floats (two adapters); the quiet tenant keeps both.
    assert ("quiet", "a", 1) in cache and ("quiet", "b", 1) in cache
    flood = [k for k, _, _ in cache.snapshot().adapters if k[0] == "flood"]
    assert flood == [("flood", "x", 7), ("flood", "x", 6)]


async def test_a_tenant_whose_share_is_all_in_use_is_refused_not_served_by_eviction():
    cache = AdapterCache(capacity_bytes=4 * 1000, tenant_share=0.5)
    await cache.ensure(("quiet", "a", 1), loader(200))
    async with cache.use(("flood", "x", 1), loader(300)):
        with pytest.raises(ResourceExhausted) as refused:
            await cache.ensure(("flood", "x", 2), loader(300))
    assert refused.value.reason == "TENANT_CACHE_SHARE_FULL"
    assert ("quiet", "a", 1) in cache
