"""Hot-swap: change which registered version of an adapter serves, on every replica.

HotSwap is the domain layer behind SwapAdapter/RollbackAdapter: it checks the target
version's stored file (sha256, through the adapter store) and warms it into the local cache
before the registry flips the serving pointer, so a refused swap changes nothing and the
old version keeps serving. Requests already running hold the weights they resolved at
their start and finish on that version; requests after the flip resolve the new one.

SwapListener runs in every inference replica: the registry announces each change on
SWAP_CHANNEL (inside the same Lua script that makes it), and the listener prefetches the
new version and tells the core to drop anything it cached about which version serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, LoraplexError
from services.common.names import owner_of
from services.common.pubsub import ChannelListener, best_effort
from services.inference.registry import (
    SWAP_CHANNEL,
    AdapterRecord,
    AdapterRegistry,
    SwapConflict,
    SwapResult,
    check_expected_sha256,
)
from services.inference.store import AdapterStore

log = logging.getLogger(__name__)

Prefetch = Callable[[AdapterRecord], Awaitable[Any]]
ROLLBACK_ATTEMPTS = 5


class HotSwap:
    """Swap and rollback for one replica. `prefetch` (optional) loads a record into the
    local adapter cache; its failures are logged, never fatal (the version's file has been
    verified already, and the first request would load it anyway)."""

    def __init__(
        self, registry: AdapterRegistry, store: AdapterStore, prefetch: Prefetch | None = None
    ) -> None:
        self.registry = registry
        self.store = store
        self.prefetch = prefetch

    async def swap(
        self, tenant: str, name: str, version: int, expected_sha256: str = "", shared: bool = False
    ) -> SwapResult:
        owner = owner_of(tenant, shared)
        if version <= 0:
            raise InvalidArgument("give the version to serve (1 or more)", reason="BAD_VERSION")
        expected = check_expected_sha256(expected_sha256)
        record = await self.registry.get(owner, name, version)
        if expected and expected != record.sha256:
            # Refused before touching the store; the registry checks again, atomically.
            raise FailedPrecondition(
                f"adapter {name!r} version {version} has sha256 {record.sha256}, "
                f"not the expected {expected}; nothing was swapped",
                reason="SHA256_MISMATCH",
                expected_sha256=expected,
                actual_sha256=record.sha256,
            )
        await self._ready(record)
        result = await self.registry.swap(owner, name, version, expected)
        log.info(
            "adapter swapped",
            extra={
                "owner": owner,
                "adapter": name,
                "version": version,
                "previous": result.previous.version,
            },
        )
        return result

    async def rollback(self, tenant: str, name: str, shared: bool = False) -> SwapResult:
        owner = owner_of(tenant, shared)
        for _ in range(ROLLBACK_ATTEMPTS):
            target = await self.registry.rollback_target(owner, name)
            await self._ready(target)
            try:
                result = await self.registry.rollback(owner, name, target.version)
            except SwapConflict:
                continue  # another swap or rollback won the race: look at the history again
            log.info(
                "adapter rolled back",
                extra={
                    "owner": owner,
                    "adapter": name,
                    "version": target.version,
                    "previous": result.previous.version,
                },
            )
            return result
        raise FailedPrecondition(
            f"adapter {name!r} kept changing during the rollback; try again",
            reason="CONCURRENT_SWAP",
        )

    async def _ready(self, record: AdapterRecord) -> None:
        """Refuse a version whose stored file is missing or fails its sha256 check."""
        try:
            await asyncio.to_thread(self.store.load, record.owner, record.name, record.sha256)
        except DataLoss as err:
            raise FailedPrecondition(
                f"adapter {record.name!r} version {record.version} cannot serve: {err.message}; "
                "nothing was swapped",
                reason="ADAPTER_INTEGRITY_FAILED",
                cause=err.reason,
            ) from err
        if self.prefetch is not None:
            await best_effort(self.prefetch, record, what="prefetch")


@dataclass(frozen=True)
class SwapEvent:
    """One change of a serving version, as published on SWAP_CHANNEL."""

    owner: str
    name: str
    version: int
    sha256: str
    previous: int  # 0: nothing served before (a first registration)
    at: float  # when the change was made (registry's clock, seconds since the epoch)
    kind: str  # "register", "swap" or "rollback"

    @classmethod
    def parse(cls, data: bytes | str) -> SwapEvent:
        body = json.loads(data)
        return cls(
            owner=str(body["owner"]),
            name=str(body["name"]),
            version=int(body["version"]),
            sha256=str(body["sha256"]),
            previous=int(body.get("previous", 0)),
            at=float(body.get("at", 0.0)),
            kind=str(body.get("kind", "swap")),
        )


class SwapListener(ChannelListener):
    """Subscribes to SWAP_CHANNEL and, for each change (one at a time, in order):
    1. prefetch(record) of the version that now serves, so it is warm before traffic
       (skipped for the first registration of a new name: bulk uploads must not churn the
       cache);
    2. on_swap(event), e.g. to drop a local cache of which version serves.
    After a lost connection it resubscribes (backing off up to max_retry_seconds) and calls
    on_reconnect(): changes made meanwhile were missed, so anything cached about serving
    versions must be dropped. Hooks may be sync or async; what they raise is logged, and
    nothing stops the listener but close()."""

    def __init__(
        self,
        redis: aioredis.Redis,
        registry: AdapterRegistry,
        *,
        prefetch: Prefetch | None = None,
        on_swap: Callable[[SwapEvent], Any] | None = None,
        on_reconnect: Callable[[], Any] | None = None,
        channel: str = SWAP_CHANNEL,
        min_retry_seconds: float = 0.05,
        max_retry_seconds: float = 5.0,
    ) -> None:
        super().__init__(
            redis,
            channel,
            name="swap listener",
            min_retry_seconds=min_retry_seconds,
            max_retry_seconds=max_retry_seconds,
        )
        self._registry = registry
        self._prefetch = prefetch
        self._on_swap = on_swap
        self._on_reconnect = on_reconnect
        self.events_handled = 0

    async def resync(self) -> None:
        if self._on_reconnect is not None:
            await best_effort(self._on_reconnect, what="swap listener on_reconnect")

    async def handle(self, data: bytes) -> None:
        try:
            event = SwapEvent.parse(data)
        except (ValueError, KeyError, TypeError):
            log.warning("malformed swap event ignored", extra={"data": data[:200]})
            return
        if self._prefetch is not None and event.previous:
            try:
                record = await self._registry.get(event.owner, event.name, event.version)
            except LoraplexError as err:
                log.warning(
                    "swap event names an unknown adapter version",
                    extra={"owner": event.owner, "adapter": event.name, "reason": err.reason},
                )
                record = None
            except Exception:
                log.exception("swap listener could not read the registry")
                record = None
            if record is not None and record.sha256 == event.sha256:
                await best_effort(self._prefetch, record, what="swap prefetch")
        if self._on_swap is not None:
            await best_effort(self._on_swap, event, what="swap listener on_swap")
        self.events_handled += 1
