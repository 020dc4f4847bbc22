"""The experiments domain layer: definitions, validation, sticky assignment. No gRPC here.

Keys (all in the tenant's hash slot):
  lp:{tenant}:experiment:<key>                          string  JSON definition
  lp:{tenant}:experiments                               zset    experiment keys (score 0)
  lp:{tenant}:experiment:<key>:sticky:<bucket_version>  hash    unit id -> variant index
  lp:{tenant}:experiment:<key>:units:<bucket_version>   hash    variant index -> units assigned
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
from services.common.names import check_adapter_name, check_tenant
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
from services.experiments.stats import Aggregate

WEIGHT_TOLERANCE = 0.01
MAX_VARIANTS = 20
MAX_UNIT_ID = 256
MAX_OUTCOMES = 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# First assignment of a unit under a bucket version wins; later calls read it back.
# Returns the stored variant index and 1 when it was stored by this call.
_STICKY = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  return {tonumber(ARGV[2]), 1}
end
return {tonumber(redis.call('HGET', KEYS[1], ARGV[1])), 0}
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


def outcome_key(tenant: str, exp_key: str, bucket_version: int, metric: str) -> str:
    return key(tenant, "experiment", exp_key, "outcome", bucket_version, metric)


def check_experiment_key(value: str) -> str:
    if not _KEY.fullmatch(value or ""):
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


class _Batcher:
    """Coalesces concurrent calls of one Lua script into one pipelined round trip: calls
    made in the same event-loop turn are flushed together on the next turn. Under
    concurrency this cuts the client-side cost per call several times (redis-py's
    per-command overhead is most of an Assign's CPU)."""

    def __init__(self, redis: aioredis.Redis, script) -> None:
        self.redis = redis
        self.script = script
        self.pending: list[tuple[list, list, asyncio.Future]] = []

    async def call(self, keys: list, args: list):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((keys, args, future))
        if len(self.pending) == 1:
            loop.call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await future

    async def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if len(batch) == 1:  # nothing to coalesce: a plain call is cheaper than a pipeline
            keys, args, future = batch[0]
            try:
                result = await self.script(keys=keys, args=args)
            except Exception as err:
                if not future.done():
                    future.set_exception(err)
            else:
                if not future.done():
                    future.set_result(result)
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args, _ in batch:
                    await self.script(keys=keys, args=args, client=pipe)
                results = await pipe.execute(raise_on_error=False)
        except Exception as err:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


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
        self._cache: dict[tuple[str, str], tuple[float, Experiment]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._sticky = redis.register_script(_STICKY)
        self._cas = redis.register_script(_CAS)
        self._outcome = redis.register_script(_OUTCOME)
        self._sticky_batch = _Batcher(redis, self._sticky)

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

    async def _get_for_assign(self, tenant: str, exp_key: str) -> Experiment:
        """The definition, from the local cache when fresh; concurrent misses for one
        experiment share a single Redis read (no connection storm on a burst)."""
        now = time.monotonic()
        ident = (tenant, exp_key)
        hit = self._cache.get(ident)
        if hit is not None and hit[0] > now:
            return hit[1]
        inflight = self._inflight.get(ident)
        if inflight is not None:
            return await asyncio.shield(inflight)
        task = asyncio.ensure_future(self.get(tenant, exp_key))
        self._inflight[ident] = task
        try:
            exp = await asyncio.shield(task)
        finally:
            self._inflight.pop(ident, None)
        if self.cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[ident] = (now + self.cache_seconds, exp)
        return exp

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
        return dataclasses.replace(exp, **fields)

    # -- assignment -------------------------------------------------------------------------

    async def assign(self, tenant: str, exp_key: str, unit_id: str) -> Assignment:
        check_tenant(tenant)
        check_experiment_key(exp_key)
        if not unit_id:
            raise InvalidArgument("unit_id is required", reason="EMPTY_UNIT_ID")
        if len(unit_id) > MAX_UNIT_ID:
            raise InvalidArgument(
                f"unit_id is longer than {MAX_UNIT_ID} characters", reason="UNIT_ID_TOO_LONG"
            )
        exp = await self._get_for_assign(tenant, exp_key)
        if exp.status != Status.RUNNING:
            raise FailedPrecondition(
                f"experiment {exp_key!r} is {exp.status}, not running",
                reason="EXPERIMENT_NOT_RUNNING",
            )
        bucketing = assignment.assign(
            unit_id,
            exp.hash_seed,
            exp.hash_version,
            exp.weights,
            exp.coverage,
            exp.namespace_tuple,
        )
        version = exp.bucket_version
        if not bucketing.in_experiment:
            # A unit outside coverage may have been assigned before coverage was lowered.
            stored = await self.redis.hget(sticky_key(tenant, exp_key, version), unit_id)
            if stored is None:
                return Assignment(exp, -1, bucketing.bucket, False)
            return Assignment(exp, int(stored), bucketing.bucket, True)
        index, created = await self._sticky_batch.call(
            keys=[sticky_key(tenant, exp_key, version), units_key(tenant, exp_key, version)],
            args=[unit_id, bucketing.variant_index],
        )
        return Assignment(exp, int(index), bucketing.bucket, not created)

    async def units_per_variant(self, exp: Experiment) -> list[int]:
        counts = await self.redis.hgetall(units_key(exp.tenant, exp.key, exp.bucket_version))
        return [int(counts.get(str(i).encode(), 0)) for i in range(len(exp.variants))]

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


__all__ = ["Assignment", "ExperimentStore", "Metric", "Namespace", "Outcome", "Update"]
