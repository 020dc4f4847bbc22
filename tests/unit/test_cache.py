from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.errors import ResourceExhausted
from services.inference.cache import AdapterCache
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
