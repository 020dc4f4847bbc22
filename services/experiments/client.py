"""The experiments client library: assignment evaluated in the caller's process.

GrowthBook's SDK pattern (`growthbook/core.py`, storage behind `AbstractStickyBucketService`):
a caller on a hot path assigns units itself instead of asking a service per request. The
gateway routes every `experiment:<key>` completion this way, and the service's `Assign`
runs this same code over its own cache (ExperimentStore.assign), so the two agree by
construction and share the sticky state.

- Definitions are read from the service's keys and cached in-process. While the client
  listens (start()), a cached definition stays until the service announces a write of it
  on DEFINITIONS_CHANNEL (start, stop, weights, coverage, bucket version...); while it does
  not (not started, or the subscription is lost), entries live `cache_seconds`.
- Hashing is services.experiments.assignment (GrowthBook's, bit for bit).
- Stickiness sits behind StickyStore. RedisStickyStore runs the service's own Lua script on
  its keys — the only writes the client makes, the same ones Assign makes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.names import MAX_UNIT_ID, check_lowercase_id, check_tenant
from services.common.pubsub import ChannelListener
from services.common.redis import run_script_many
from services.experiments import assignment
from services.experiments.keys import (
    DEFINITIONS_CHANNEL,
    calls_key,
    experiment_key,
    sticky_key,
    units_key,
)
from services.experiments.model import Experiment, Status, Variant, from_json

log = logging.getLogger(__name__)

MAX_CACHED = 10_000

# One assignment, one round trip. The first assignment of a unit under a bucket version wins
# (ARGV[2]: the hash's variant index, -1 when the hash leaves the unit out); later calls
# read it back. Units in the experiment have their Assign calls counted. Returns the
# variant index (-1: not in the experiment) and 1 when it was stored by this call.
_ASSIGN = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
local created = 0
if not v then
  if ARGV[2] == '-1' then return {-1, 0} end
  v = ARGV[2]
  redis.call('HSET', KEYS[1], ARGV[1], v)
  redis.call('HINCRBY', KEYS[2], v, 1)
  created = 1
end
local m = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
redis.call('HINCRBY', KEYS[2], v .. ':a', 1)
redis.call('HINCRBY', KEYS[2], v .. ':a2', 2 * m - 1)
return {tonumber(v), created}
"""


def check_experiment_key(value: str) -> str:
    return check_lowercase_id(value, "experiment key", "INVALID_EXPERIMENT_KEY")


def check_unit(unit_id: str) -> None:
    if not unit_id:
        raise InvalidArgument("unit_id is required", reason="EMPTY_UNIT_ID")
    if len(unit_id) > MAX_UNIT_ID:
        raise InvalidArgument(
            f"unit_id is longer than {MAX_UNIT_ID} characters", reason="UNIT_ID_TOO_LONG"
        )


async def read_definition(redis: aioredis.Redis, tenant: str, exp_key: str) -> bytes:
    """The stored JSON of one definition; NotFound for another tenant's, as for a missing one."""
    check_tenant(tenant)
    check_experiment_key(exp_key)
    raw = await redis.get(experiment_key(tenant, exp_key))
    if raw is None:
        raise NotFound(f"experiment {exp_key!r} not found", reason="EXPERIMENT_NOT_FOUND")
    return raw


@dataclass(frozen=True)
class Assignment:
    experiment: Experiment
    variant_index: int  # -1: not in the experiment
    bucket: float
    sticky: bool

    @property
    def in_experiment(self) -> bool:
        return self.variant_index >= 0

    @property
    def variant(self) -> Variant | None:
        return self.experiment.variants[self.variant_index] if self.in_experiment else None

    @property
    def serving(self) -> Variant:
        """The variant that serves the unit: the control when it is not in the experiment
        (GrowthBook serves excluded units the first variation)."""
        return self.experiment.variants[max(self.variant_index, 0)]


@dataclass(frozen=True)
class Plan:
    """A definition as assignment needs it; the bucket ranges are computed once per read."""

    experiment: Experiment
    ranges: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, exp: Experiment) -> Plan:
        return cls(exp, tuple(assignment.bucket_ranges(exp.weights, exp.coverage)))

    def bucket(self, unit_id: str) -> tuple[int, float]:
        """(the hash's variant index or -1, the unit's hash n); the experiment must run."""
        exp = self.experiment
        if exp.status != Status.RUNNING:
            raise FailedPrecondition(
                f"experiment {exp.key!r} is {exp.status}, not running",
                reason="EXPERIMENT_NOT_RUNNING",
            )
        n = assignment.gb_hash(exp.hash_seed, unit_id, exp.hash_version)
        ns = exp.namespace
        if ns is not None and not assignment.in_namespace(unit_id, ns.name, ns.start, ns.end):
            return assignment.NOT_IN_EXPERIMENT, n
        return assignment.choose_variation(n, self.ranges), n


class StickyStore(Protocol):
    """Where sticky assignments live (GrowthBook's AbstractStickyBucketService)."""

    async def assign(self, experiment: Experiment, unit_id: str, index: int) -> tuple[int, bool]:
        """The unit's variant index under the experiment's bucket version: the stored one,
        else `index`, stored now unless it is -1 (not in the experiment). Returns it and
        whether this call stored it."""
        ...


class RedisStickyStore:
    """The service's sticky keys, through its script (which also counts the calls that
    GetResults' design effect needs). The calls made in one event-loop turn go to Redis as
    one pipeline: one connection and one round trip for a burst, where a call each would
    take a connection each (redis-py's pool refuses the 101st)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(_ASSIGN)
        self._batch: list[tuple[list[str], list[str | int], asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()  # referenced until done

    async def assign(self, experiment: Experiment, unit_id: str, index: int) -> tuple[int, bool]:
        tenant, key, version = experiment.tenant, experiment.key, experiment.bucket_version
        keys = [
            sticky_key(tenant, key, version),
            units_key(tenant, key, version),
            calls_key(tenant, key, version),
        ]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._batch.append((keys, [unit_id, index], future))
        if len(self._batch) == 1:  # the first of this turn sends them all, in a task of
            task = loop.create_task(self._send())  # its own: a caller that leaves cancels nothing
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        stored, created = await future
        return int(stored), bool(created)

    async def _send(self) -> None:
        batch, self._batch = self._batch, []
        try:
            if len(batch) == 1:  # the usual case unless under load: no pipeline to build
                keys, args, _ = batch[0]
                replies = [await self._script(keys=keys, args=args)]
            else:
                calls = [(keys, args) for keys, args, _ in batch]
                replies = await run_script_many(
                    self.redis, self._script, calls, raise_on_error=False
                )
            for (_, _, future), reply in zip(batch, replies, strict=True):
                _settle(future, reply)
        except Exception as err:  # the connection failed: every call of the batch did
            for _, _, future in batch:
                _settle(future, err)


def _settle(future: asyncio.Future, reply: object) -> None:
    if future.done():  # its caller left
        return
    if isinstance(reply, Exception):
        future.set_exception(reply)
    else:
        future.set_result(reply)


@dataclass(frozen=True)
class _Entry:
    plan: Plan
    expires: float  # time.monotonic(); inf: until a write is announced
    generation: int  # the listener's generation when it was read


class _Announcements(ChannelListener):
    def __init__(self, redis: aioredis.Redis, client: ExperimentsClient) -> None:
        super().__init__(redis, DEFINITIONS_CHANNEL, name="experiment definitions listener")
        self.client = client

    async def handle(self, data: bytes) -> None:
        try:
            body = json.loads(data)
            tenant, key = str(body["tenant"]), str(body["key"])
        except (ValueError, KeyError, TypeError):
            log.warning("malformed definition announcement", extra={"data": data[:200]})
            self.client.clear()  # which one changed is unknown: forget them all
            return
        self.client.invalidate(tenant, key)

    async def resync(self) -> None:
        self.client.clear()  # entries are stale by generation already; free them


class ExperimentsClient:
    """Assigns units to experiment variants in this process: `await assign(tenant, key,
    unit)`. start() (from a running event loop) listens for definition writes; close()
    stops listening. The redis client is the caller's."""

    def __init__(
        self,
        redis: aioredis.Redis,
        sticky: StickyStore | None = None,
        *,
        cache_seconds: float = 1.0,
    ) -> None:
        self.redis = redis
        self.sticky = sticky if sticky is not None else RedisStickyStore(redis)
        self.cache_seconds = cache_seconds
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[Plan]] = {}
        self._writes = 0  # writes heard of: a read that began before one is not cached
        self._listener = _Announcements(redis, self)

    def start(self) -> None:
        self._listener.start()

    async def wait_listening(self, timeout: float = 10.0) -> None:
        await self._listener.wait_subscribed(timeout)

    async def close(self) -> None:
        await self._listener.close()

    def stop(self) -> None:
        """close() for synchronous shutdown paths."""
        self._listener.stop()

    def invalidate(self, tenant: str, exp_key: str) -> None:
        self._writes += 1
        self._cache.pop((tenant, exp_key), None)

    def clear(self) -> None:
        self._writes += 1
        self._cache.clear()

    async def assign(self, tenant: str, exp_key: str, unit_id: str) -> Assignment:
        check_unit(unit_id)
        plan = await self.plan(tenant, exp_key)
        index, n = plan.bucket(unit_id)
        # Also for a unit the hash leaves out: it may have been assigned before coverage
        # was lowered, and then keeps its variant.
        stored, created = await self.sticky.assign(plan.experiment, unit_id, index)
        return Assignment(plan.experiment, stored, n, stored >= 0 and not created)

    async def plan(self, tenant: str, exp_key: str) -> Plan:
        """The definition's plan, from the cache when fresh (a hit skips the name checks:
        only checked names are cached); concurrent misses for one experiment share a single
        Redis read (no connection storm on a burst)."""
        ident = (tenant, exp_key)
        hit = self._cache.get(ident)
        if hit is not None:
            if hit.expires == math.inf:
                if hit.generation == self._listener.generation:
                    return hit.plan
            elif hit.expires > time.monotonic():
                return hit.plan
        inflight = self._inflight.get(ident)
        if inflight is not None:
            return await asyncio.shield(inflight)
        task = asyncio.ensure_future(self._read(tenant, exp_key))
        self._inflight[ident] = task
        try:
            return await asyncio.shield(task)
        finally:
            self._inflight.pop(ident, None)

    async def _read(self, tenant: str, exp_key: str) -> Plan:
        writes, generation = self._writes, self._listener.generation
        listening = self._listener.subscribed.is_set()
        started = time.monotonic()
        plan = Plan.of(from_json(await read_definition(self.redis, tenant, exp_key)))
        if (writes, generation) != (self._writes, self._listener.generation):
            return plan  # a write (or a gap in the announcements) came meanwhile
        if listening:
            expires = math.inf
        elif self.cache_seconds > 0:
            expires = started + self.cache_seconds
        else:
            return plan
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[(tenant, exp_key)] = _Entry(plan, expires, generation)
        return plan
