"""Loaded adapters, bounded in bytes, evicted least-recently-used first.

An adapter that a running request uses is pinned (reference count > 0) and never evicted
under it. Concurrent requests for the same missing adapter share one load.
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


@dataclass
class CacheSnapshot:
    capacity_bytes: int
    used_bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    load_seconds_total: float
    load_seconds_p50: float
    load_seconds_p95: float
    # (key, size_bytes, hits), most recently used first
    adapters: list[tuple[Hashable, int, int]] = field(default_factory=list)


class AdapterCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Future[_Entry]] = {}
        self._used = 0
        self.hits = self.misses = self.evictions = 0
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

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    async def _acquire(
        self, key: Hashable, load: Callable[[], Awaitable[LoraWeights]]
    ) -> tuple[_Entry, bool]:
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            entry.hits += 1
            entry.users += 1
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
            entry = _Entry(weights=weights, size=weights.size_bytes)
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
            if self._entries[key].users == 0:
                self._drop(key)
                self.evictions += 1
        if self._used + size > self.capacity_bytes:
            raise ResourceExhausted(
                "adapter cache is full of adapters that running requests use; retry shortly",
                reason="ADAPTER_CACHE_FULL",
            )

    def _drop(self, key: Hashable) -> None:
        self._used -= self._entries.pop(key).size

    def snapshot(self) -> CacheSnapshot:
        loads = np.fromiter(self._recent_loads, dtype=float)
        p50, p95 = np.percentile(loads, [50, 95]) if loads.size else (0.0, 0.0)
        return CacheSnapshot(
            capacity_bytes=self.capacity_bytes,
            used_bytes=self._used,
            entries=len(self._entries),
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            load_seconds_total=self._load_seconds_total,
            load_seconds_p50=float(p50),
            load_seconds_p95=float(p95),
            adapters=[(k, e.size, e.hits) for k, e in reversed(self._entries.items())],
        )
