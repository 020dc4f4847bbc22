"""The analytics domain layer: validation, pre-aggregation, idempotent writes, queries.

No gRPC here. Key layout (all under the tenant's hash tag, so one tenant's keys share a
Redis Cluster slot and one Lua script may touch them all); <res> is "m" (1-minute buckets)
or "h" (1-hour buckets), <start> the bucket's start in Unix seconds:

    lp:{t}:an:<res>:<start>:c:<adapter>   hash  "<version>|<experiment>|<variant>|<stat>" -> n
    lp:{t}:an:<res>:<start>:s:<adapter>   hash  "<version>|<experiment>|<variant>|<bin>"  -> n
    lp:{t}:an:<res>:<start>:sum:<stat>    hash  "<adapter>" -> n  (all series summed; for
                                          TopAdapters: stats n, ok, ct, ls, rn, rs)
    lp:{t}:an:batch:<batch_id>            string, set once per recorded batch (EX ttl)

Counter stats: n requests, ok successes, e.<CODE> errors by code, pt/ct prompt/completion
tokens, ls/ls2 latency sum and sum of squares, tn/ts/ts2 time-to-first-token count, sum and
sum of squares, rn/rs/rs2 rating count, sum and sum of squares. Sketch bins are those of
services.analytics.sketch. Every event is written to its minute and its hour bucket (the
hour bucket is the roll-up), and keys expire at the end of their bucket plus retention.

Idempotency: one Lua script per (tenant, batch) does SET NX on the batch key and, only if
that succeeded, all of the batch's increments. A script runs atomically and reaches the AOF
as one MULTI/EXEC, so after any crash either the batch key and all its counts are there or
none of them are: a retry of an unacknowledged batch is counted exactly once.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import prometheus_client
import redis.asyncio as aioredis
import redis.exceptions

from services.analytics.settings import AnalyticsSettings
from services.analytics.sketch import ZERO, ZERO_INDEX, LatencySketch, bucket_index
from services.common.errors import InvalidArgument, Unavailable
from services.common.keys import key
from services.common.names import check_adapter_name, check_tenant

MINUTE, HOUR = 60, 3600
RESOLUTIONS = {MINUTE: "m", HOUR: "h"}
STATUSES = frozenset(
    {
        "OK",
        "CANCELLED",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "INTERNAL",
    }
)
QUANTILES = (0.5, 0.95, 0.99)
RANK_METRICS = ("success_rate", "p95_latency", "requests", "avg_rating", "tokens_per_second")
MAX_TOP_LIMIT = 1000
MAX_POINTS = 2000

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BATCH_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

EVENTS_ACCEPTED = prometheus_client.Counter(
    "loraplex_analytics_events_accepted_total", "Events counted by RecordBatch."
)
EVENTS_REJECTED = prometheus_client.Counter(
    "loraplex_analytics_events_rejected_total", "Events rejected by RecordBatch.", ["reason"]
)
DUPLICATE_BATCHES = prometheus_client.Counter(
    "loraplex_analytics_duplicate_batches_total",
    "RecordBatch calls (per tenant) whose batch id had been recorded before.",
)

# KEYS[1]: the batch key; KEYS[2..]: hashes. ARGV[1]: the batch key's ttl; ARGV[2]: JSON,
# per hash [expire-at, [field, int, ...], [field, "float", ...]] (one JSON string packs and
# parses far faster than thousands of separate arguments).
_RECORD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local ops = cjson.decode(ARGV[2])
for k = 2, #KEYS do
  local h, op = KEYS[k], ops[k - 1]
  local ints, floats = op[2], op[3]
  for i = 1, #ints, 2 do redis.call('HINCRBY', h, ints[i], ints[i + 1]) end
  for i = 1, #floats, 2 do redis.call('HINCRBYFLOAT', h, floats[i], floats[i + 1]) end
  redis.call('EXPIREAT', h, op[1])
end
return 1
"""

# TopAdapters for the metrics the summary hashes answer, inside Redis so that 10,000
# adapters' sums never cross the wire. KEYS: the summary hashes, stat-major (all buckets of
# ARGV[5], then of ARGV[6], ...). ARGV: buckets, metric, limit, min_requests, stats...
# Returns [adapter, value, requests, ...], best first; ties: more requests, then name.
_TOP = """
local nb, metric = tonumber(ARGV[1]), ARGV[2]
local limit, minreq = tonumber(ARGV[3]), tonumber(ARGV[4])
local sums, s = {}, 0
for i = 5, #ARGV do
  local t = {}
  for _ = 1, nb do
    s = s + 1
    local flat = redis.call('HGETALL', KEYS[s])
    for j = 1, #flat, 2 do t[flat[j]] = (t[flat[j]] or 0) + tonumber(flat[j + 1]) end
  end
  sums[ARGV[i]] = t
end
-- Names in byte order, whatever locale the server's strcoll follows.
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = a:byte(i), b:byte(i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function better(x, y)
  if x[2] ~= y[2] then return x[2] > y[2] end
  if x[3] ~= y[3] then return x[3] > y[3] end
  return before(x[1], y[1])
end
-- The best `limit` rows, kept sorted: one comparison with the worst kept for most rows.
local top = {}
local function offer(row)
  if #top == limit and not better(row, top[limit]) then return end
  local lo, hi = 1, #top + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if better(row, top[mid]) then hi = mid else lo = mid + 1 end
  end
  table.insert(top, lo, row)
  if #top > limit then top[#top] = nil end
end
local n = sums['n']
local base = n
if metric == 'avg_rating' then base = sums['rn'] end
for a, _ in pairs(base) do
  local req = n[a] or 0
  if req >= minreq then
    local v
    if metric == 'success_rate' then
      if req > 0 then v = (sums['ok'][a] or 0) / req end
    elseif metric == 'requests' then
      v = req
    elseif metric == 'avg_rating' then
      v = (sums['rs'][a] or 0) / sums['rn'][a]
    elseif metric == 'tokens_per_second' then
      local ls = sums['ls'][a] or 0
      v = 0
      if ls > 0 then v = (sums['ct'][a] or 0) / ls end
    end
    if v then offer({a, v, req}) end
  end
end
local out = {}
for _, r in ipairs(top) do
  out[#out + 1] = r[1]
  out[#out + 1] = string.format('%.17g', r[2])
  out[#out + 1] = r[3]
end
return out
"""


@dataclass(slots=True)
class Event:
    """One event as the caller sent it; kind is "request", "feedback" or "" (missing)."""

    tenant: str
    adapter: str
    version: int = 0
    experiment: str = ""
    variant: str = ""
    time: float | None = None  # Unix seconds; None: when the batch was received
    kind: str = "request"
    status: str = "OK"
    latency_seconds: float = 0.0
    ttft_seconds: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rating: float = 0.0


@dataclass
class RecordResult:
    accepted: int
    rejected: list[tuple[int, str]]
    duplicate: bool

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.rejected))


@dataclass(frozen=True)
class SeriesFilter:
    version: int | None = None
    experiment: str | None = None
    variant: str | None = None

    def matches(self, version: str, experiment: str, variant: str) -> bool:
        return (
            (self.version is None or str(self.version) == version)
            and (self.experiment is None or self.experiment == experiment)
            and (self.variant is None or self.variant == variant)
        )


@dataclass
class Metrics:
    requests: int = 0
    successes: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum: float = 0.0
    latency_sum_sq: float = 0.0
    ttft_count: int = 0
    ttft_sum: float = 0.0
    ttft_sum_sq: float = 0.0
    rating_count: int = 0
    rating_sum: float = 0.0
    rating_sum_sq: float = 0.0
    sketch: LatencySketch = field(default_factory=LatencySketch)

    _INT = {"n": "requests", "ok": "successes", "pt": "prompt_tokens", "ct": "completion_tokens"}
    _INT |= {"tn": "ttft_count", "rn": "rating_count"}
    _FLOAT = {"ls": "latency_sum", "ls2": "latency_sum_sq", "ts": "ttft_sum"}
    _FLOAT |= {"ts2": "ttft_sum_sq", "rs": "rating_sum", "rs2": "rating_sum_sq"}

    def add_stat(self, stat: str, raw: bytes | str) -> None:
        if stat in self._INT:
            name = self._INT[stat]
            setattr(self, name, getattr(self, name) + int(raw))
        elif stat in self._FLOAT:
            name = self._FLOAT[stat]
            setattr(self, name, getattr(self, name) + float(raw))
        elif stat.startswith("e."):
            code = stat[2:]
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + int(raw)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 0.0

    @property
    def latency_mean(self) -> float:
        return self.latency_sum / self.requests if self.requests else 0.0

    @property
    def ttft_mean(self) -> float:
        return self.ttft_sum / self.ttft_count if self.ttft_count else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.latency_sum if self.latency_sum > 0 else 0.0

    @property
    def rating_mean(self) -> float:
        return self.rating_sum / self.rating_count if self.rating_count else 0.0

    @property
    def rating_stddev(self) -> float:
        """Sample standard deviation (n - 1) of the ratings; 0 with fewer than two."""
        n = self.rating_count
        if n < 2:
            return 0.0
        var = (self.rating_sum_sq - self.rating_sum**2 / n) / (n - 1)
        return math.sqrt(max(var, 0.0))

    def quantile(self, q: float) -> float:
        return self.sketch.quantile(q)


@dataclass(frozen=True)
class Window:
    start: float  # first bucket's start
    end: float  # last bucket's end
    resolution: int

    @property
    def buckets(self) -> list[int]:
        return list(range(int(self.start), int(self.end), self.resolution))


@dataclass(frozen=True)
class Ranked:
    adapter: str
    value: float  # the ranking metric's value
    requests: int


def reject_reason(event: Event, now: float, settings: AnalyticsSettings) -> str | None:
    """Why an event cannot be counted, or None when it can."""
    try:
        check_tenant(event.tenant)
    except InvalidArgument:
        return "INVALID_TENANT"
    if not event.adapter:
        return "MISSING_ADAPTER"
    try:
        check_adapter_name(event.adapter)
    except InvalidArgument:
        return "INVALID_ADAPTER_NAME"
    if not 0 <= event.version < 2**32:
        return "INVALID_VERSION"
    if event.experiment and not _LABEL.fullmatch(event.experiment):
        return "INVALID_EXPERIMENT"
    if event.variant and not _LABEL.fullmatch(event.variant):
        return "INVALID_VARIANT"
    if event.time is not None:
        if not math.isfinite(event.time):
            return "NOT_FINITE"
        if event.time > now + settings.max_future_skew_seconds:
            return "TIMESTAMP_IN_FUTURE"
        if event.time < now - settings.hour_retention_seconds:
            return "TIMESTAMP_TOO_OLD"
    if event.kind == "request":
        if event.status not in STATUSES:
            return "UNKNOWN_STATUS"
        for value in (event.latency_seconds, event.ttft_seconds):
            if value is None:
                continue
            if not math.isfinite(value):
                return "NOT_FINITE"
            if value < 0:
                return "NEGATIVE_LATENCY"
        if event.prompt_tokens < 0 or event.completion_tokens < 0:
            return "NEGATIVE_TOKENS"
        return None
    if event.kind == "feedback":
        return None if math.isfinite(event.rating) else "NOT_FINITE"
    return "MISSING_KIND"


class _Acc:
    """Sums of one series in one minute, before they become hash-field increments."""

    __slots__ = ("bins", "ct", "errors", "ls", "ls2", "n", "ok", "pt", "rn", "rs", "rs2")
    __slots__ += ("tn", "ts", "ts2")

    def __init__(self) -> None:
        self.n = self.ok = self.pt = self.ct = self.tn = self.rn = 0
        self.ls = self.ls2 = self.ts = self.ts2 = self.rs = self.rs2 = 0.0
        self.errors: Counter[str] = Counter()
        self.bins: Counter[int] = Counter()

    def merge(self, other: _Acc) -> None:
        for name in ("n", "ok", "pt", "ct", "tn", "rn", "ls", "ls2", "ts", "ts2", "rs", "rs2"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.update(other.errors)
        self.bins.update(other.bins)


class _TenantBatch:
    """One tenant's share of a batch, pre-aggregated in Python: per event a few additions
    into its (adapter, series, minute) sums; the hash-field increments for the minute and
    the hour buckets are produced once per batch from those sums."""

    def __init__(self, tenant: str, settings: AnalyticsSettings) -> None:
        self.tenant = tenant
        self.settings = settings
        self.events = 0
        self.acc: dict[tuple[str, str, int], _Acc] = {}

    def add(self, event: Event, when: float) -> None:
        self.events += 1
        series = f"{event.version}|{event.experiment}|{event.variant}|"
        group = (event.adapter, series, int(when // MINUTE) * MINUTE)
        acc = self.acc.get(group)
        if acc is None:
            acc = self.acc[group] = _Acc()
        if event.kind == "request":
            latency = event.latency_seconds
            acc.n += 1
            if event.status == "OK":
                acc.ok += 1
            else:
                acc.errors[event.status] += 1
            acc.pt += event.prompt_tokens
            acc.ct += event.completion_tokens
            acc.ls += latency
            acc.ls2 += latency * latency
            ttft = event.ttft_seconds
            if ttft is not None:
                acc.tn += 1
                acc.ts += ttft
                acc.ts2 += ttft * ttft
            acc.bins[bucket_index(latency)] += 1
        else:
            acc.rn += 1
            acc.rs += event.rating
            acc.rs2 += event.rating * event.rating

    def script_args(self, batch_id: str) -> tuple[list[str], list[object]]:
        s = self.settings
        rolled: dict[tuple[str, str, int, int], _Acc] = {}
        for (adapter, series, minute), acc in self.acc.items():
            rolled[(adapter, series, MINUTE, minute)] = acc
        for (adapter, series, minute), acc in self.acc.items():
            hour_key = (adapter, series, HOUR, minute // HOUR * HOUR)
            hour = rolled.get(hour_key)
            if hour is None:
                hour = rolled[hour_key] = _Acc()
            hour.merge(acc)
        # hash key -> (expire at, int increments, float increments)
        hashes: dict[str, tuple[int, list[object], list[object]]] = {}

        def target(hkey: str, expire_at: int) -> tuple[int, list[object], list[object]]:
            found = hashes.get(hkey)
            if found is None:
                found = hashes[hkey] = (expire_at, [], [])
            return found

        prefix = key(self.tenant, "an")  # + ":<res>:<start>:<kind>[:<adapter>]"
        for (adapter, series, res, start), acc in rolled.items():
            tag = RESOLUTIONS[res]
            retention = s.minute_retention_seconds if res == MINUTE else s.hour_retention_seconds
            expire_at = start + res + retention
            _, ints, floats = target(f"{prefix}:{tag}:{start}:c:{adapter}", expire_at)
            for stat, value in (("n", acc.n), ("ok", acc.ok), ("pt", acc.pt), ("ct", acc.ct)):
                if value:
                    ints += [series + stat, value]
            for code, value in acc.errors.items():
                ints += [f"{series}e.{code}", value]
            for stat, value in (("tn", acc.tn), ("rn", acc.rn)):
                if value:
                    ints += [series + stat, value]
            for stat, fvalue in (
                ("ls", acc.ls),
                ("ls2", acc.ls2),
                ("ts", acc.ts),
                ("ts2", acc.ts2),
                ("rs", acc.rs),
                ("rs2", acc.rs2),
            ):
                if fvalue:
                    floats += [series + stat, repr(fvalue)]
            if acc.bins:
                _, ints, _ = target(f"{prefix}:{tag}:{start}:s:{adapter}", expire_at)
                for index, value in acc.bins.items():
                    ints += [f"{series}{ZERO if index == ZERO_INDEX else index}", value]
            for stat, value in (("n", acc.n), ("ok", acc.ok), ("ct", acc.ct), ("rn", acc.rn)):
                if value:
                    target(f"{prefix}:{tag}:{start}:sum:{stat}", expire_at)[1].extend(
                        (adapter, value)
                    )
            for stat, fvalue in (("ls", acc.ls), ("rs", acc.rs)):
                if fvalue:
                    target(f"{prefix}:{tag}:{start}:sum:{stat}", expire_at)[2].extend(
                        (adapter, repr(fvalue))
                    )

        keys = [key(self.tenant, "an", "batch", batch_id), *hashes]
        ops = json.dumps(list(hashes.values()), separators=(",", ":"))
        return keys, [s.batch_id_ttl_seconds, ops]


class AnalyticsCore:
    def __init__(self, settings: AnalyticsSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._script = redis.register_script(_RECORD)
        self._top = redis.register_script(_TOP)

    async def ping(self) -> None:
        await self.redis.ping()

    # --- ingest -------------------------------------------------------------------------

    async def record_batch(
        self, batch_id: str, events: Sequence[Event], *, now: float | None = None
    ) -> RecordResult:
        if not _BATCH_ID.fullmatch(batch_id or ""):
            raise InvalidArgument(
                "batch_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                reason="INVALID_BATCH_ID",
            )
        limit = self.settings.max_batch_events
        if len(events) > limit:
            raise InvalidArgument(
                f"batch has {len(events)} events, at most {limit} are allowed",
                reason="BATCH_TOO_LARGE",
                max_batch_events=str(limit),
            )
        now = time.time() if now is None else now
        rejected: list[tuple[int, str]] = []
        groups: dict[str, _TenantBatch] = {}
        accepted = 0
        for index, event in enumerate(events):
            reason = reject_reason(event, now, self.settings)
            if reason:
                rejected.append((index, reason))
                continue
            group = groups.get(event.tenant)
            if group is None:
                group = groups[event.tenant] = _TenantBatch(event.tenant, self.settings)
            group.add(event, now if event.time is None else event.time)
            accepted += 1
        duplicate = False
        if groups:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for group in groups.values():
                        keys, args = group.script_args(batch_id)
                        await self._script(keys=keys, args=args, client=pipe)
                    applied = await pipe.execute()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
                raise Unavailable(
                    "the analytics store is unavailable; retry with the same batch_id",
                    reason="STORE_UNAVAILABLE",
                ) from err
            fresh = [g.events for g, a in zip(groups.values(), applied, strict=True) if int(a)]
            DUPLICATE_BATCHES.inc(len(applied) - len(fresh))
            EVENTS_ACCEPTED.inc(sum(fresh))
            duplicate = not fresh
        for _, reason in rejected:
            EVENTS_REJECTED.labels(reason).inc()
        return RecordResult(accepted=accepted, rejected=rejected, duplicate=duplicate)

    # --- queries ------------------------------------------------------------------------

    def window(
        self, window_seconds: float | None, end: float | None, resolution: int | None = None
    ) -> Window:
        window_seconds = window_seconds or 3600.0
        if not math.isfinite(window_seconds) or window_seconds < 0:
            raise InvalidArgument("window must be positive", reason="INVALID_WINDOW")
        if window_seconds > self.settings.hour_retention_seconds:
            raise InvalidArgument(
                f"window is longer than the retention ({self.settings.hour_retention_seconds}s)",
                reason="INVALID_WINDOW",
            )
        if resolution is None:
            short = window_seconds <= self.settings.minute_query_max_seconds
            resolution = MINUTE if short else HOUR
        end = time.time() if end is None else end
        first = math.floor((end - window_seconds) / resolution) * resolution
        last_end = math.ceil(end / resolution) * resolution
        if last_end <= first:
            last_end = first + resolution
        if (last_end - first) // resolution > MAX_POINTS:
            raise InvalidArgument(
                f"window spans more than {MAX_POINTS} buckets; use a coarser resolution",
                reason="INVALID_WINDOW",
            )
        return Window(first, last_end, resolution)

    async def _read(self, pipe_calls: Sequence[tuple[str, str]]) -> list[dict[bytes, bytes]]:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, hkey in pipe_calls:
                    pipe.hgetall(hkey)
                return await pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            raise Unavailable(
                "the analytics store is unavailable", reason="STORE_UNAVAILABLE"
            ) from err

    async def _bucket_metrics(
        self, tenant: str, adapter: str, window: Window, series: SeriesFilter
    ) -> list[Metrics]:
        tag = RESOLUTIONS[window.resolution]
        calls = []
        for start in window.buckets:
            calls.append(("c", key(tenant, "an", tag, start, "c", adapter)))
            calls.append(("s", key(tenant, "an", tag, start, "s", adapter)))
        replies = await self._read(calls)
        out = []
        for i in range(0, len(replies), 2):
            m = Metrics()
            _fold_counters(m, replies[i], series)
            _fold_sketch(m.sketch, replies[i + 1], series)
            out.append(m)
        return out

    async def adapter_metrics(
        self,
        tenant: str,
        adapter: str,
        window_seconds: float | None = None,
        end: float | None = None,
        series: SeriesFilter | None = None,
    ) -> tuple[Metrics, Window]:
        check_tenant(tenant)
        check_adapter_name(adapter)
        win = self.window(window_seconds, end)
        total = Metrics()
        for m in await self._bucket_metrics(tenant, adapter, win, series or SeriesFilter()):
            _merge(total, m)
        return total, win

    async def timeseries(
        self,
        tenant: str,
        adapter: str,
        window_seconds: float | None = None,
        end: float | None = None,
        resolution: int | None = None,
        series: SeriesFilter | None = None,
    ) -> tuple[list[tuple[int, Metrics]], Window]:
        check_tenant(tenant)
        check_adapter_name(adapter)
        if resolution not in (None, MINUTE, HOUR):
            raise InvalidArgument("resolution must be a minute or an hour", reason="INVALID")
        win = self.window(window_seconds, end, resolution)
        points = await self._bucket_metrics(tenant, adapter, win, series or SeriesFilter())
        return list(zip(win.buckets, points, strict=True)), win

    async def top_adapters(
        self,
        tenant: str,
        metric: str,
        limit: int = 10,
        window_seconds: float | None = None,
        end: float | None = None,
        min_requests: int = 0,
    ) -> tuple[list[Ranked], Window]:
        """The tenant's adapters ranked by metric, best first; ties go to the adapter with
        more requests, then to the adapter name that sorts first."""
        check_tenant(tenant)
        if metric not in RANK_METRICS:
            raise InvalidArgument(
                f"metric must be one of {', '.join(RANK_METRICS)}", reason="INVALID_METRIC"
            )
        limit = limit or 10
        if not 1 <= limit <= MAX_TOP_LIMIT:
            raise InvalidArgument(f"limit must be in [1, {MAX_TOP_LIMIT}]", reason="INVALID_LIMIT")
        if min_requests < 0:
            raise InvalidArgument("min_requests must be >= 0", reason="INVALID_MIN_REQUESTS")
        win = self.window(window_seconds, end)
        tag = RESOLUTIONS[win.resolution]
        buckets = win.buckets
        if metric != "p95_latency":
            stats = {
                "success_rate": ("n", "ok"),
                "requests": ("n",),
                "avg_rating": ("n", "rn", "rs"),
                "tokens_per_second": ("n", "ct", "ls"),
            }[metric]
            keys = [key(tenant, "an", tag, b, "sum", stat) for stat in stats for b in buckets]
            args = [len(buckets), metric, limit, min_requests, *stats]
            try:
                flat = await self._top(keys=keys, args=args)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
                raise Unavailable(
                    "the analytics store is unavailable", reason="STORE_UNAVAILABLE"
                ) from err
            return [
                Ranked(flat[i].decode(), float(flat[i + 1]), int(flat[i + 2]))
                for i in range(0, len(flat), 3)
            ], win
        # p95_latency: merge each adapter's sketches, only of the buckets it has requests in.
        replies = await self._read([("n", key(tenant, "an", tag, b, "sum", "n")) for b in buckets])
        requests: dict[bytes, float] = defaultdict(float)
        active: dict[bytes, list[int]] = defaultdict(list)
        for b, reply in zip(buckets, replies, strict=True):
            for adapter, raw in reply.items():
                requests[adapter] += float(raw)
                active[adapter].append(b)
        names = sorted(a for a, n in requests.items() if n and n >= min_requests)
        calls = [
            ("s", key(tenant, "an", tag, b, "s", a.decode())) for a in names for b in active[a]
        ]
        sketch_replies = iter(await self._read(calls))
        values = {}
        for a in names:
            sketch = LatencySketch()
            for _ in active[a]:
                _fold_sketch(sketch, next(sketch_replies), SeriesFilter())
            values[a] = sketch.quantile(0.95)
        ranked = sorted(values.items(), key=lambda kv: (kv[1], -requests[kv[0]], kv[0]))
        return [Ranked(a.decode(), v, int(requests[a])) for a, v in ranked[:limit]], win


def _fold_counters(m: Metrics, reply: dict[bytes, bytes], series: SeriesFilter) -> None:
    for raw_field, raw in reply.items():
        version, experiment, variant, stat = raw_field.decode().split("|")
        if series.matches(version, experiment, variant):
            m.add_stat(stat, raw)


def _fold_sketch(sketch: LatencySketch, reply: dict[bytes, bytes], series: SeriesFilter) -> None:
    for raw_field, raw in reply.items():
        version, experiment, variant, bin_ = raw_field.decode().split("|")
        if series.matches(version, experiment, variant):
            sketch.counts[bin_] += int(raw)


def _merge(into: Metrics, other: Metrics) -> None:
    for name in (*Metrics._INT.values(), *Metrics._FLOAT.values()):
        setattr(into, name, getattr(into, name) + getattr(other, name))
    for code, n in other.errors_by_code.items():
        into.errors_by_code[code] = into.errors_by_code.get(code, 0) + n
    into.sketch.merge(other.sketch)
