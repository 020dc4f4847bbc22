"""The experiments domain layer: definitions, validation, outcomes, results' inputs. No gRPC.

Key names are in services.experiments.keys; assignment (shared with the callers that
assign in their own process) is services.experiments.client.
"""

from __future__ import annotations

import dataclasses
import json
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
from services.common.keys import PLATFORM, adapter_index, adapter_versions
from services.common.names import check_adapter_name, check_tenant
from services.common.paging import decode_page_token, encode_page_token
from services.common.redis import run_script_many
from services.experiments.client import (
    Assignment,
    ExperimentsClient,
    check_experiment_key,
    read_definition,
)
from services.experiments.keys import (
    DEFINITIONS_CHANNEL,
    experiment_index,
    experiment_key,
    outcome_key,
    sequential_key,
    sticky_key,
    units_key,
)
from services.experiments.model import (
    Experiment,
    Metric,
    Namespace,
    Status,
    VariantAdapter,
    from_json,
)
from services.experiments.stats import Aggregate

WEIGHT_TOLERANCE = 0.01
MAX_VARIANTS = 20
MAX_OUTCOMES = 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

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

# Compare-and-set of a definition, so concurrent updates cannot lose each other's changes,
# announced (ARGV[3] channel, ARGV[4] message) in the same step for every client's cache.
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""


def _announcement(exp: Experiment) -> str:
    return json.dumps({"tenant": exp.tenant, "key": exp.key})


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


@dataclass(frozen=True)
class Outcome:
    experiment_key: str
    unit_id: str
    metric: str
    value: float


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
        effect at once; changes made by another replica within that many seconds, or at
        once after `self.assigner.start()` (it then listens for announced writes)."""
        self.redis = redis
        self.assigner = ExperimentsClient(redis, cache_seconds=definition_cache_seconds)
        self._cas = redis.register_script(_CAS)
        self._outcome = redis.register_script(_OUTCOME)
        self._running_min = redis.register_script(_RUNNING_MIN)

    def close(self) -> None:
        """Stops listening for definition writes, if it was (the redis client is the
        caller's to close)."""
        self.assigner.stop()

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
        await self.redis.publish(DEFINITIONS_CHANNEL, _announcement(exp))
        return exp

    async def get(self, tenant: str, exp_key: str) -> Experiment:
        return from_json(await read_definition(self.redis, tenant, exp_key))

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
            raw = await read_definition(self.redis, tenant, exp_key)
            exp = self._apply(from_json(raw), change)
            exp = await self.validate(exp)
            args = [raw, exp.to_json(), DEFINITIONS_CHANNEL, _announcement(exp)]
            if await self._cas(keys=[experiment_key(tenant, exp_key)], args=args):
                self.assigner.invalidate(tenant, exp_key)  # at once here, listening or not
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

    async def assign(self, tenant: str, exp_key: str, unit_id: str) -> Assignment:
        """What the client library gives a caller that assigns in its own process."""
        return await self.assigner.assign(tenant, exp_key, unit_id)

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
        replies = await run_script_many(self.redis, self._outcome, calls)
        recorded = sum(int(r) for r in replies)
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
