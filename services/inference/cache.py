"""Loaded adapters in two tiers, each bounded in bytes, evicted least-recently-used first.

`AdapterCache` is one tier. An adapter that a running request uses holds a reference and
is never evicted under it; an operator can pin one for good; an optional TTL drops what
has not been used for a while. Each tenant (the first part of a cache key: an adapter's
owner) may hold at most `tenant_share` of the tier: past it, the tenant's own least
recently used adapters make room, never another tenant's, so one tenant cycling through
many adapters cannot evict everyone else's. Concurrent requests for the same missing
adapter share one load. `TieredAdapterCache` stacks a device tier (GPU memory) on a host
tier (CPU memory): a device miss is filled from the host tier, a host miss from the store.
On a CPU-only machine the weights already live where the model runs, so there is one tier.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import ResourceExhausted
from services.inference.lora import LoraWeights


@dataclass
class _Entry:
    weights: LoraWeights
    size: int
    users: int = 0
    hits: int = 0
    pinned: bool = False
    last_used: float = 0.0  # time.monotonic()


@dataclass
class CacheSnapshot:
    tier: str
    capacity_bytes: int
    used_bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    load_seconds_total: float
    load_seconds_p50: float
    load_seconds_p95: float
    load_seconds_p99: float = 0.0
    expirations: int = 0
    pinned: int = 0
    ttl_seconds: float | None = None
    # (key, size_bytes, hits), most recently used first
    adapters: list[tuple[Hashable, int, int]] = field(default_factory=list)


class AdapterCache:
    def __init__(
        self,
        capacity_bytes: int,
        *,
        tier: str = "host",
        ttl_seconds: float | None = None,
        tenant_share: float = 1.0,
    ) -> None:
        if not 0 < tenant_share <= 1:
            raise ValueError(f"tenant_share must be in (0, 1], got {tenant_share}")
        self.tier = tier
        self.capacity_bytes = capacity_bytes
        self.ttl_seconds = ttl_seconds
        self.tenant_share = tenant_share
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Future[_Entry]] = {}
        self._used = 0
        self.hits = self.misses = self.evictions = self.expirations = 0
        self._load_seconds_total = 0.0
        self._recent_loads: deque[float] = deque(maxlen=1000)

    @asynccontextmanager
    async def use(
        self, key: Hashable, load: Callable[[], Awaitable[LoraWeights]]
    ) -> AsyncIterator[LoraWeights]:
        """Yield the adapter's weights, loading them on a miss; pinned while in use."""
        entry, _ = await self._acquire(key, load)
        try:
            yield entry.weights
        finally:
            entry.users -= 1

    async def ensure(self, key: Hashable, load: Callable[[], Awaitable[LoraWeights]]) -> bool:
        """Load the adapter if needed. Returns whether it was already cached."""
        entry, was_cached = await self._acquire(key, load)
        entry.users -= 1
        return was_cached

    def remove(self, key: Hashable) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry.users:
            return False
        self._drop(key)
        return True

    def pin(self, key: Hashable, pinned: bool = True) -> bool:
        """Keep a cached adapter whatever the LRU order and TTL (or stop keeping it)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.pinned = pinned
        return entry is not None

    def expire(self) -> int:
        """Drop idle entries older than the TTL; returns how many went."""
        if self.ttl_seconds is None:
            return 0
        deadline = time.monotonic() - self.ttl_seconds
        stale = [
            k
            for k, e in self._entries.items()
            if e.last_used < deadline and not e.users and not e.pinned
        ]
        for key in stale:
            self._drop(key)
        self.expirations += len(stale)
        return len(stale)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    async def _acquire(
        self, key: Hashable, load: Callable[[], Awaitable[LoraWeights]]
    ) -> tuple[_Entry, bool]:
        self.expire()
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            entry.hits += 1
            entry.users += 1
            entry.last_used = time.monotonic()
            self._entries.move_to_end(key)
            return entry, True
        pending = self._loading.get(key)
        if pending is not None:
            entry = await asyncio.shield(pending)
            entry.users += 1
            return entry, False
        self.misses += 1
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            started = time.perf_counter()
            weights = await load()
            elapsed = time.perf_counter() - started
            self._load_seconds_total += elapsed
            self._recent_loads.append(elapsed)
            entry = _Entry(weights=weights, size=weights.size_bytes, last_used=time.monotonic())
            self._make_tenant_room(_tenant_of(key), entry.size)
            self._make_room(entry.size)
            self._entries[key] = entry
            self._used += entry.size
            future.set_result(entry)
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[key]
        entry.users += 1
        return entry, False

    def _make_tenant_room(self, tenant: object, size: int) -> None:
        """Keep the tenant within its share, evicting only its own idle adapters."""
        share = int(self.capacity_bytes * self.tenant_share)
        if tenant is None or share >= self.capacity_bytes:
            return
        own = [k for k in self._entries if _tenant_of(k) == tenant]
        used = sum(self._entries[k].size for k in own)
        for key in own:  # least recently used first
            if used + size <= share:
                return
            entry = self._entries[key]
            if entry.users == 0 and not entry.pinned:
                used -= entry.size
                self._drop(key)
                self.evictions += 1
        if used + size > share:
            raise ResourceExhausted(
                f"this tenant's adapters would take more than its share of the {self.tier} "
                f"adapter cache ({share} bytes); retry when fewer are in use",
                reason="TENANT_CACHE_SHARE_FULL",
            )

    def _make_room(self, size: int) -> None:
        if size > self.capacity_bytes:
            raise ResourceExhausted(
                f"adapter needs {size} bytes, more than the whole adapter cache "
                f"({self.capacity_bytes} bytes)",
                reason="ADAPTER_TOO_LARGE",
            )
        for key in list(self._entries):
            if self._used + size <= self.capacity_bytes:
                return
            entry = self._entries[key]
            if entry.users == 0 and not entry.pinned:
                self._drop(key)
                self.evictions += 1
        if self._used + size > self.capacity_bytes:
            raise ResourceExhausted(
                f"the {self.tier} adapter cache is full of adapters in use or pinned; "
                "retry shortly",
                reason="ADAPTER_CACHE_FULL",
            )

    def _drop(self, key: Hashable) -> None:
        self._used -= self._entries.pop(key).size

    def snapshot(self) -> CacheSnapshot:
        loads = np.fromiter(self._recent_loads, dtype=float)
        p50, p95, p99 = np.percentile(loads, [50, 95, 99]) if loads.size else (0.0, 0.0, 0.0)
        return CacheSnapshot(
            tier=self.tier,
            capacity_bytes=self.capacity_bytes,
            used_bytes=self._used,
            entries=len(self._entries),
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            load_seconds_total=self._load_seconds_total,
            load_seconds_p50=float(p50),
            load_seconds_p95=float(p95),
            load_seconds_p99=float(p99),
            expirations=self.expirations,
            pinned=sum(e.pinned for e in self._entries.values()),
            ttl_seconds=self.ttl_seconds,
            adapters=[(k, e.size, e.hits) for k, e in reversed(self._entries.items())],
        )


def _tenant_of(key: Hashable) -> object:
    """Whose adapter a cache key names: (owner, name, version) or (tenant, digest, 0)."""
    return key[0] if isinstance(key, tuple) and key else None


class TieredAdapterCache:
    """A device tier over a host tier. A request pins its adapter in the device tier (what
    the model reads); filling it pins the host copy only while it is copied over."""

    def __init__(
        self,
        host: AdapterCache,
        device: AdapterCache | None = None,
        to_device: Callable[[LoraWeights], LoraWeights] | None = None,
    ) -> None:
        if (device is None) != (to_device is None):
            raise ValueError("a device tier needs a to_device copy function, and vice versa")
        self.host = host
        self.device = device
        self._to_device = to_device

    @property
    def tiers(self) -> list[AdapterCache]:
        return [t for t in (self.device, self.host) if t is not None]

    def _device_load(
        self, key: Hashable, load: Callable[[], Awaitable[LoraWeights]]
    ) -> Callable[[], Awaitable[LoraWeights]]:
        async def fill() -> LoraWeights:
            async with self.host.use(key, load) as weights:
                return await asyncio.to_thread(self._to_device, weights)

        return fill

    @asynccontextmanager
    async def use(
        self, key: Hashable, load: Callable[[], Awaitable[LoraWeights]]
    ) -> AsyncIterator[LoraWeights]:
        if self.device is None:
            async with self.host.use(key, load) as weights:
                yield weights
            return
        async with self.device.use(key, self._device_load(key, load)) as weights:
            yield weights

    async def ensure(self, key: Hashable, load: Callable[[], Awaitable[LoraWeights]]) -> bool:
        """Load into every tier if needed (prefetch). Returns whether the top tier had it."""
        if self.device is None:
            return await self.host.ensure(key, load)
        return await self.device.ensure(key, self._device_load(key, load))

    def remove(self, key: Hashable) -> bool:
        removed = [tier.remove(key) for tier in self.tiers]
        return any(removed)

    def pin(self, key: Hashable, pinned: bool = True) -> bool:
        return any([tier.pin(key, pinned) for tier in self.tiers])

    def __contains__(self, key: Hashable) -> bool:
        return any(key in tier for tier in self.tiers)

    def snapshot(self) -> list[CacheSnapshot]:
        """One snapshot per tier, the device tier first when there is one."""
        return [tier.snapshot() for tier in self.tiers]
