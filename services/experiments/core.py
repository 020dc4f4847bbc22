"""The experiments domain layer: definitions, validation, sticky assignment. No gRPC here.

Keys (all in the tenant's hash slot):
  lp:{tenant}:experiment:<key>                          string  JSON definition
  lp:{tenant}:experiments                               zset    experiment keys (score 0)
  lp:{tenant}:experiment:<key>:sticky:<bucket_version>  hash    unit id -> variant index
  lp:{tenant}:experiment:<key>:units:<bucket_version>   hash    variant index -> units assigned;
      "<index>:a" -> Assign calls answered in the experiment, "<index>:a2" -> sum over the
      variant's units of (their Assign calls)^2 (the design effect of request-level metrics)
  lp:{tenant}:experiment:<key>:calls:<bucket_version>   hash    unit id -> its Assign calls
  lp:{tenant}:experiment:<key>:seq:<bucket_version>     hash    "<source>|<metric>|<variant>"
      -> the smallest always-valid p-value reported so far (its running minimum)
  lp:{tenant}:experiment:<key>:outcome:<bv>:<metric>:units  hash  unit id -> "count:total"
  lp:{tenant}:experiment:<key>:outcome:<bv>:<metric>        hash  "<variant index>:n|sum|sumsq"
      -> units, sum and sum of squares of the per-unit values (the statistics' inputs)
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from dataclasses import dataclass, replace

import redis.asyncio as aioredis

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.common.keys import PLATFORM, adapter_index, adapter_versions, key
from services.common.names import LOWERCASE_ID, MAX_UNIT_ID, check_adapter_name, check_tenant
from services.common.paging import decode_page_token, encode_page_token
from services.experiments import assignment
from services.experiments.model import (
    Experiment,
    Metric,
    Namespace,
    Status,
    Variant,
    VariantAdapter,
    from_json,
)
from services.experiments.pipe import ScriptPipe, SyncScriptConnection
from services.experiments.stats import Aggregate

WEIGHT_TOLERANCE = 0.01
MAX_VARIANTS = 20
MAX_OUTCOMES = 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# One Assign, one round trip. The first assignment of a unit under a bucket version wins
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

# The running minimum of always-valid p-values: ARGV holds field, p pairs.
_RUNNING_MIN = """
for i = 1, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if (not old) or tonumber(ARGV[i + 1]) < old then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# One outcome of a unit: updates the unit's value (rate: 1 once it converted; mean: the mean
# of its observations) and the variant's n / sum / sum of squares by the change it makes.
_OUTCOME = """
local variant = redis.call('HGET', KEYS[1], ARGV[1])
if not variant then return 0 end
local value = tonumber(ARGV[2])
local rate = ARGV[3] == 'rate'
local count, total = 0, 0
local state = redis.call('HGET', KEYS[2], ARGV[1])
if state then
  local sep = string.find(state, ':', 1, true)
  count = tonumber(string.sub(state, 1, sep - 1))
  total = tonumber(string.sub(state, sep + 1))
end
local old, new, new_total = 0, 0, 0
if rate then
  if count > 0 and total > 0 then old = 1 end
  if value ~= 0 then new_total = total + 1 else new_total = total end
  if new_total > 0 then new = 1 end
else
  if count > 0 then old = total / count end
  new_total = total + value
  new = new_total / (count + 1)
end
if count == 0 then redis.call('HINCRBY', KEYS[3], variant .. ':n', 1) end
redis.call('HINCRBYFLOAT', KEYS[3], variant .. ':sum', string.format('%.17g', new - old))
redis.call('HINCRBYFLOAT', KEYS[3], variant .. ':sumsq',
  string.format('%.17g', new * new - old * old))
redis.call('HSET', KEYS[2], ARGV[1], (count + 1) .. ':' .. string.format('%.17g', new_total))
return 1
"""

# Compare-and-set of a definition, so concurrent updates cannot lose each other's changes.
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def experiment_key(tenant: str, exp_key: str) -> str:
    return key(tenant, "experiment", exp_key)


def experiment_index(tenant: str) -> str:
    return key(tenant, "experiments")


def sticky_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "sticky", bucket_version)


def units_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "units", bucket_version)


def calls_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "calls", bucket_version)


def sequential_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "seq", bucket_version)


def outcome_key(tenant: str, exp_key: str, bucket_version: int, metric: str) -> str:
    return key(tenant, "experiment", exp_key, "outcome", bucket_version, metric)


def check_experiment_key(value: str) -> str:
    if not LOWERCASE_ID.fullmatch(value or ""):
        raise InvalidArgument(
            f"invalid experiment key {value!r}: use 1-63 lowercase letters, digits, '-' or '_'",
            reason="INVALID_EXPERIMENT_KEY",
        )
    return value


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_weights(weights: list[float]) -> None:
    if any(not _finite(w) or w < 0 for w in weights):
        raise InvalidArgument(
            f"traffic weights must be non-negative numbers, got {weights}",
            reason="INVALID_WEIGHTS",
        )
    total = sum(weights)
    if abs(total - 1) > WEIGHT_TOLERANCE:
        raise InvalidArgument(
            f"traffic weights must sum to 1 (±{WEIGHT_TOLERANCE}), they sum to {total:g}",
            reason="INVALID_WEIGHTS",
        )


def check_coverage(coverage: float) -> None:
    if not _finite(coverage) or not 0 <= coverage <= 1:
        raise InvalidArgument(
            f"coverage must be between 0 and 1, got {coverage}", reason="INVALID_COVERAGE"
        )


def _check_fraction(name: str, value: float, reason: str) -> None:
    # 0 means "the configured default"
    if not _finite(value) or not 0 <= value < 1:
        raise InvalidArgument(f"{name} must be in [0, 1), got {value}", reason=reason)


def _check_name(what: str, value: str) -> None:
    if not _NAME.fullmatch(value or ""):
        raise InvalidArgument(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '-' or '_'",
            reason="INVALID_NAME",
        )


class _RedisPyScript:
    """ScriptPipe's interface over redis-py, for connections ScriptPipe does not handle
    (TLS, credential providers, clusters)."""

    def __init__(self, redis: aioredis.Redis, script: str) -> None:
        self.script = redis.register_script(script)

    async def call(self, numkeys: int, *parts):
        return await self.script(keys=list(parts[:numkeys]), args=list(parts[numkeys:]))

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Plan:
    """What Assign needs of one definition, computed once per definition read."""

    experiment: Experiment
    ranges: list[tuple[float, float]]
    keys: tuple[bytes, bytes, bytes]  # sticky, units, calls
    expires: float


@dataclass(frozen=True)
class Outcome:
    experiment_key: str
    unit_id: str
    metric: str
    value: float


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


@dataclass(frozen=True)
class VariantCounts:
    """Per variant: units assigned, Assign calls answered in the experiment, and the sum
    over units of (their Assign calls)^2."""

    units: list[int]
    assignments: list[int]
    assignments_squared: list[int]


@dataclass(frozen=True)
class Update:
    """What UpdateExperiment changes; None leaves a field as it is."""

    action: str | None = None  # "start" | "stop"
    traffic_weights: dict[str, float] | None = None  # variant name -> weight
    coverage: float | None = None
    description: str | None = None
    minimum_detectable_effect: float | None = None
    target_power: float | None = None
    alpha: float | None = None
    bump_bucket_version: bool = False


class ExperimentStore:
    def __init__(self, redis: aioredis.Redis, definition_cache_seconds: float = 0.0) -> None:
        """definition_cache_seconds > 0: Assign reuses a definition read that recently (one
        Redis round trip per Assign instead of two). Changes made through this store take
        effect at once; changes made by another replica within that many seconds."""
        self.redis = redis
        self.cache_seconds = definition_cache_seconds
        self._cache: dict[tuple[str, str], _Plan] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._cas = redis.register_script(_CAS)
        self._outcome = redis.register_script(_OUTCOME)
        self._running_min = redis.register_script(_RUNNING_MIN)
        supported = ScriptPipe.supports(redis)
        self._assign = (ScriptPipe if supported else _RedisPyScript)(redis, _ASSIGN)
        self._assign_blocking = SyncScriptConnection(redis, _ASSIGN) if supported else None

    def close(self) -> None:
        """Closes the Assign connections (the redis client is the caller's to close)."""
        self._assign.close()
        if self._assign_blocking is not None:
            self._assign_blocking.close()

    # -- validation -------------------------------------------------------------------------

    async def _check_adapter(self, tenant: str, adapter: VariantAdapter) -> None:
        check_adapter_name(adapter.name)
        for owner in (tenant, PLATFORM):
            if adapter.version:
                found = await self.redis.hexists(
                    adapter_versions(owner, adapter.name), str(adapter.version)
                )
            else:
                found = await self.redis.hexists(adapter_index(owner), adapter.name)
            if found:
                return
        # Another tenant's adapter gets the same answer as a missing one.
        suffix = f" version {adapter.version}" if adapter.version else ""
        raise NotFound(f"adapter {adapter.name!r}{suffix} not found", reason="ADAPTER_NOT_FOUND")

    async def validate(self, exp: Experiment) -> Experiment:
        """Checks a definition and fills defaults; raises InvalidArgument / NotFound."""
        check_tenant(exp.tenant)
        check_experiment_key(exp.key)
        if len(exp.variants) < 2:
            raise InvalidArgument(
                f"an experiment needs at least two variants, got {len(exp.variants)}",
                reason="TOO_FEW_VARIANTS",
            )
        if len(exp.variants) > MAX_VARIANTS:
            raise InvalidArgument(f"at most {MAX_VARIANTS} variants", reason="TOO_MANY_VARIANTS")
        names = [v.name for v in exp.variants]
        for name in names:
            _check_name("variant name", name)
        if len(set(names)) != len(names):
            raise InvalidArgument(
                f"variant names must be unique, got {names}", reason="DUPLICATE_VARIANT"
            )
        check_weights(exp.weights)
        check_coverage(exp.coverage)
        if exp.hash_version not in (1, 2):
            raise InvalidArgument(
                f"hash version must be 1 or 2, got {exp.hash_version}",
                reason="INVALID_HASH_VERSION",
            )
        ns = exp.namespace
        if ns is not None:
            _check_name("namespace name", ns.name)
            if not (_finite(ns.start) and _finite(ns.end) and 0 <= ns.start < ns.end <= 1):
                raise InvalidArgument(
                    f"namespace range must satisfy 0 <= start < end <= 1, "
                    f"got [{ns.start}, {ns.end})",
                    reason="INVALID_NAMESPACE",
                )
        for metric in exp.metrics:
            _check_name("metric name", metric.name)
        _check_fraction("minimum_detectable_effect", exp.minimum_detectable_effect, "INVALID_MDE")
        _check_fraction("target_power", exp.target_power, "INVALID_POWER")
        _check_fraction("alpha", exp.alpha, "INVALID_ALPHA")
        variants = []
        for variant in exp.variants:
            adapters = []
            for adapter in variant.adapters:
                if not _finite(adapter.weight) or adapter.weight < 0 or adapter.version < 0:
                    raise InvalidArgument(
                        f"adapter {adapter.name!r} in variant {variant.name!r}: composition "
                        "weight must be a non-negative number",
                        reason="INVALID_COMPOSITION_WEIGHT",
                    )
                await self._check_adapter(exp.tenant, adapter)
                adapters.append(replace(adapter, weight=adapter.weight or 1.0))
            variants.append(replace(variant, adapters=tuple(adapters)))
        return replace(exp, variants=tuple(variants), hash_seed=exp.hash_seed or exp.key)

    # -- definitions ------------------------------------------------------------------------

    async def create(self, exp: Experiment) -> Experiment:
        exp = await self.validate(exp)
        now = time.time()
        exp = replace(
            exp,
            status=Status.DRAFT,
            bucket_version=1,
            create_time=now,
            update_time=now,
            start_time=0.0,
            stop_time=0.0,
        )
        stored = await self.redis.set(experiment_key(exp.tenant, exp.key), exp.to_json(), nx=True)
        if not stored:
            raise AlreadyExists(
                f"experiment {exp.key!r} already exists", reason="EXPERIMENT_EXISTS"
            )
        await self.redis.zadd(experiment_index(exp.tenant), {exp.key: 0})
        return exp

    async def _raw(self, tenant: str, exp_key: str) -> bytes:
        check_tenant(tenant)
        check_experiment_key(exp_key)
        raw = await self.redis.get(experiment_key(tenant, exp_key))
        if raw is None:
            raise NotFound(f"experiment {exp_key!r} not found", reason="EXPERIMENT_NOT_FOUND")
        return raw

    async def get(self, tenant: str, exp_key: str) -> Experiment:
        return from_json(await self._raw(tenant, exp_key))

    async def _plan(self, tenant: str, exp_key: str) -> _Plan:
        """The definition's assignment plan, from the local cache when fresh (a hit skips the
        name checks: only checked names are cached); concurrent misses for one experiment
        share a single Redis read (no connection storm on a burst)."""
        ident = (tenant, exp_key)
        hit = self._cache.get(ident)
        now = time.monotonic()
        if hit is not None and hit.expires > now:
            return hit
        inflight = self._inflight.get(ident)
        if inflight is not None:
            return await asyncio.shield(inflight)
        task = asyncio.ensure_future(self._read_plan(tenant, exp_key, now))
        self._inflight[ident] = task
        try:
            return await asyncio.shield(task)
        finally:
            self._inflight.pop(ident, None)

    async def _read_plan(self, tenant: str, exp_key: str, now: float) -> _Plan:
        exp = await self.get(tenant, exp_key)
        version = exp.bucket_version
        plan = _Plan(
            exp,
            assignment.bucket_ranges(exp.weights, exp.coverage),
            (
                sticky_key(tenant, exp_key, version).encode(),
                units_key(tenant, exp_key, version).encode(),
                calls_key(tenant, exp_key, version).encode(),
            ),
            now + self.cache_seconds,
        )
        if self.cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[(tenant, exp_key)] = plan
        return plan

    async def list(
        self, tenant: str, page_size: int = 0, page_token: str = "", status: Status | None = None
    ) -> tuple[list[Experiment], str]:
        check_tenant(tenant)
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", reason="BAD_PAGE_SIZE")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        offset = decode_page_token(page_token)
        out: list[Experiment] = []
        index = experiment_index(tenant)
        while len(out) < size:
            keys = await self.redis.zrange(index, offset, offset + size - 1)
            if not keys:
                return out, ""
            raws = await self.redis.mget([experiment_key(tenant, k.decode()) for k in keys])
            for raw in raws:
                offset += 1
                if raw is None:
                    continue
                exp = from_json(raw)
                if status is None or exp.status == status:
                    out.append(exp)
                if len(out) == size:
                    break
        more = await self.redis.zcard(index) > offset
        return out, encode_page_token(offset) if more else ""

    async def update(self, tenant: str, exp_key: str, change: Update) -> Experiment:
        for _ in range(10):
            raw = await self._raw(tenant, exp_key)
            exp = self._apply(from_json(raw), change)
            exp = await self.validate(exp)
            if await self._cas(keys=[experiment_key(tenant, exp_key)], args=[raw, exp.to_json()]):
                self._cache.pop((tenant, exp_key), None)
                return exp
        raise FailedPrecondition(
            "the experiment is being changed concurrently; retry", reason="CONCURRENT_UPDATE"
        )

    @staticmethod
    def _apply(exp: Experiment, change: Update) -> Experiment:
        now = time.time()
        fields: dict = {"update_time": now}
        if change.action == "start":
            if exp.status != Status.DRAFT:
                raise FailedPrecondition(
                    f"only a draft experiment can be started; this one is {exp.status}",
                    reason="EXPERIMENT_NOT_DRAFT",
                )
            fields.update(status=Status.RUNNING, start_time=now)
        elif change.action == "stop":
            if exp.status == Status.STOPPED:
                raise FailedPrecondition(
                    "the experiment is already stopped", reason="EXPERIMENT_STOPPED"
                )
            fields.update(status=Status.STOPPED, stop_time=now)
        elif change.action is not None:
            raise InvalidArgument(f"unknown action {change.action!r}", reason="BAD_ACTION")
        if change.traffic_weights is not None:
            names = {v.name for v in exp.variants}
            unknown = set(change.traffic_weights) - names
            if unknown or set(change.traffic_weights) != names:
                raise InvalidArgument(
                    f"traffic weights must name every variant exactly: {sorted(names)}",
                    reason="INVALID_WEIGHTS",
                )
            fields["variants"] = tuple(
                replace(v, traffic_weight=change.traffic_weights[v.name]) for v in exp.variants
            )
        for name in ("coverage", "description", "minimum_detectable_effect", "target_power"):
            value = getattr(change, name)
            if value is not None:
                fields[name] = value
        if change.alpha is not None:
            fields["alpha"] = change.alpha
        if change.bump_bucket_version:
            fields["bucket_version"] = exp.bucket_version + 1
            fields["bucket_time"] = now
        return dataclasses.replace(exp, **fields)

    # -- assignment -------------------------------------------------------------------------

    @staticmethod
    def _check_unit(unit_id: str) -> None:
        if not unit_id:
            raise InvalidArgument("unit_id is required", reason="EMPTY_UNIT_ID")
        if len(unit_id) > MAX_UNIT_ID:
            raise InvalidArgument(
                f"unit_id is longer than {MAX_UNIT_ID} characters", reason="UNIT_ID_TOO_LONG"
            )

    @staticmethod
    def _bucket(plan: _Plan, exp_key: str, unit_id: str) -> tuple[int, float]:
        """(the hash's variant index or -1, the unit's hash n); the experiment must run."""
        exp = plan.experiment
        if exp.status != Status.RUNNING:
            raise FailedPrecondition(
                f"experiment {exp_key!r} is {exp.status}, not running",
                reason="EXPERIMENT_NOT_RUNNING",
            )
        n = assignment.gb_hash(exp.hash_seed, unit_id, exp.hash_version)
        ns = exp.namespace
        if ns is not None and not assignment.in_namespace(unit_id, ns.name, ns.start, ns.end):
            return assignment.NOT_IN_EXPERIMENT, n
        return assignment.choose_variation(n, plan.ranges), n

    async def assign(self, tenant: str, exp_key: str, unit_id: str) -> Assignment:
        self._check_unit(unit_id)
        plan = await self._plan(tenant, exp_key)
        index, n = self._bucket(plan, exp_key, unit_id)
        # Also for a unit the hash leaves out: it may have been assigned before coverage
        # was lowered, and then keeps its variant.
        stored, created = await self._assign.call(3, *plan.keys, unit_id, index)
        return Assignment(plan.experiment, stored, n, stored >= 0 and not created)

    def assign_blocking(
        self, tenant: str, exp_key: str, unit_id: str, loop: asyncio.AbstractEventLoop
    ) -> Assignment:
        """assign() for a worker thread of a thread-pool gRPC server: the Redis call goes
        over this thread's own blocking connection; a definition-cache miss (and anything
        ScriptPipe does not support) runs on `loop`, where the store's other work runs."""
        if self._assign_blocking is None:
            future = asyncio.run_coroutine_threadsafe(self.assign(tenant, exp_key, unit_id), loop)
            return future.result()
        self._check_unit(unit_id)
        plan = self._cache.get((tenant, exp_key))
        if plan is None or plan.expires <= time.monotonic():
            plan = asyncio.run_coroutine_threadsafe(self._plan(tenant, exp_key), loop).result()
        index, n = self._bucket(plan, exp_key, unit_id)
        stored, created = self._assign_blocking.call(3, *plan.keys, unit_id, index)
        return Assignment(plan.experiment, stored, n, stored >= 0 and not created)

    async def variant_counts(self, exp: Experiment) -> VariantCounts:
        raw = await self.redis.hgetall(units_key(exp.tenant, exp.key, exp.bucket_version))
        counts = {k.decode(): int(v) for k, v in raw.items()}
        size = range(len(exp.variants))
        return VariantCounts(
            [counts.get(str(i), 0) for i in size],
            [counts.get(f"{i}:a", 0) for i in size],
            [counts.get(f"{i}:a2", 0) for i in size],
        )

    async def units_per_variant(self, exp: Experiment) -> list[int]:
        return (await self.variant_counts(exp)).units

    # -- sequential p-values ----------------------------------------------------------------

    async def sequential_floors(self, exp: Experiment) -> dict[str, float]:
        """The running minimum of each always-valid p-value reported so far (per bucket
        version), by "<source>|<metric>|<variant>"."""
        raw = await self.redis.hgetall(sequential_key(exp.tenant, exp.key, exp.bucket_version))
        return {k.decode(): float(v) for k, v in raw.items()}

    async def lower_sequential_floors(self, exp: Experiment, values: dict[str, float]) -> None:
        """Atomically lowers the stored running minima to these values where smaller."""
        if not values:
            return
        args: list[str] = []
        for field_name, p in values.items():
            args += [field_name, repr(float(p))]
        await self._running_min(
            keys=[sequential_key(exp.tenant, exp.key, exp.bucket_version)], args=args
        )

    # -- outcomes ---------------------------------------------------------------------------

    async def record_outcomes(self, tenant: str, outcomes: list[Outcome]) -> tuple[int, int]:
        """Returns (recorded, skipped); units never assigned are skipped."""
        check_tenant(tenant)
        if len(outcomes) > MAX_OUTCOMES:
            raise InvalidArgument(
                f"at most {MAX_OUTCOMES} outcomes per call", reason="TOO_MANY_OUTCOMES"
            )
        experiments: dict[str, Experiment] = {}
        calls = []
        for o in outcomes:
            if o.experiment_key not in experiments:
                experiments[o.experiment_key] = await self.get(tenant, o.experiment_key)
            exp = experiments[o.experiment_key]
            if not o.unit_id:
                raise InvalidArgument("unit_id is required", reason="EMPTY_UNIT_ID")
            metric = next((m for m in exp.metrics if m.name == o.metric), None)
            if metric is None:
                raise InvalidArgument(
                    f"experiment {exp.key!r} has no metric {o.metric!r}; it has "
                    f"{[m.name for m in exp.metrics]}",
                    reason="UNKNOWN_METRIC",
                )
            if not _finite(o.value) or (metric.kind == "rate" and o.value not in (0, 1)):
                raise InvalidArgument(
                    f"bad value {o.value} for {metric.kind} metric {o.metric!r}"
                    + (" (use 0 or 1)" if metric.kind == "rate" else ""),
                    reason="INVALID_OUTCOME_VALUE",
                )
            version = exp.bucket_version
            out_key = outcome_key(tenant, exp.key, version, metric.name)
            calls.append(
                (
                    [sticky_key(tenant, exp.key, version), out_key + ":units", out_key],
                    [o.unit_id, repr(float(o.value)), str(metric.kind)],
                )
            )
        recorded = 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await self._outcome(keys=keys, args=args, client=pipe)
            recorded = sum(int(r) for r in await pipe.execute())
        return recorded, len(calls) - recorded

    async def aggregates(self, exp: Experiment) -> dict[str, list[Aggregate]]:
        """Per metric, one Aggregate per variant (in variant order)."""
        out = {}
        for metric in exp.metrics:
            raw = await self.redis.hgetall(
                outcome_key(exp.tenant, exp.key, exp.bucket_version, metric.name)
            )
            fields = {k.decode(): float(v) for k, v in raw.items()}
            out[metric.name] = [
                Aggregate(
                    int(fields.get(f"{i}:n", 0)),
                    fields.get(f"{i}:sum", 0.0),
                    fields.get(f"{i}:sumsq", 0.0),
                )
                for i in range(len(exp.variants))
            ]
        return out


__all__ = [
    "Assignment",
    "ExperimentStore",
    "Metric",
    "Namespace",
    "Outcome",
    "Update",
    "VariantCounts",
]
