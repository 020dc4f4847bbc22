"""The analytics domain layer: validation, pre-aggregation, idempotent writes, queries.

No gRPC here. Key layout (all under the tenant's hash tag, so one tenant's keys share a
Redis Cluster slot and one Lua script may touch them all); <res> is "m" (1-minute buckets)
or "h" (1-hour buckets), <start> the bucket's start in Unix seconds:

    lp:{t}:an:<res>:<start>:c:<adapter>   hash  "<version>|<experiment>|<variant>|*" -> record
    lp:{t}:an:<res>:<start>:s:<adapter>   hash  "<version>|<experiment>|<variant>|<bin>"  -> n
    lp:{t}:an:<res>:<start>:rank          hash  "<adapter>" -> record (all series summed,
                                          for TopAdapters: ingest.RANK_STATS)
    lp:{t}:an:batch:<batch_id>            string, set once per recorded batch (EX ttl)

A record is little-endian doubles: ingest.COUNTERS for a series (n requests, ok successes,
pt/ct prompt/completion tokens, tn ttft count, rn rating count, ls/ls2 latency sum and sum
of squares, ts/ts2 ttft sum and sum of squares, rs/rs2 rating sum and sum of squares, then
requests per error code). Counter hashes written before records existed hold one field
per stat ("<series>|n", "<series>|e.<CODE>", ...); readers add both. Sketch bins are those
of services.analytics.sketch. Every event is written to its minute and its hour bucket
(the hour bucket is the roll-up, done by the same script), and keys expire at the end of
their bucket plus retention.

Idempotency: one Lua script per (tenant, batch) does SET NX on the batch key and, only if
that succeeded, all of the batch's increments. A script runs atomically and reaches the AOF
as one MULTI/EXEC, so after any crash either the batch key and all its counts are there or
none of them are: a retry of an unacknowledged batch is counted exactly once. The write
path itself is in services.analytics.ingest.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import prometheus_client
import redis.asyncio as aioredis
import redis.exceptions

from services.analytics import ingest
from services.analytics.ingest import (
    COARSE_EDGES,
    COUNTERS,
    KINDS,
    RANK_STATS,
    STATUS_NUMBERS,
    Columns,
    event_reason,
    label_reason,
    unpack,
)
from services.analytics.settings import AnalyticsSettings
from services.analytics.sketch import LatencySketch, bucket_value
from services.common.errors import InvalidArgument, Unavailable
from services.common.keys import key
from services.common.names import check_adapter_name, check_tenant

MINUTE, HOUR = 60, 3600
RESOLUTIONS = {MINUTE: "m", HOUR: "h"}
QUANTILES = (0.5, 0.95, 0.99)
RANK_METRICS = ("success_rate", "p95_latency", "requests", "avg_rating", "tokens_per_second")
MAX_TOP_LIMIT = 1000
MAX_POINTS = 2000

_BATCH_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

EVENTS_ACCEPTED = prometheus_client.Counter(
    "loraplex_analytics_events_accepted_total", "Events counted by RecordBatch."
)
EVENTS_REJECTED = prometheus_client.Counter(
    "loraplex_analytics_events_rejected_total", "Events rejected by RecordBatch.", ["reason"]
)
INGEST_LAG = prometheus_client.Histogram(
    "loraplex_analytics_ingest_lag_seconds",
    "Age of each RecordBatch's oldest event when the batch arrives (export delay + retries).",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
DUPLICATE_BATCHES = prometheus_client.Counter(
    "loraplex_analytics_duplicate_batches_total",
    "RecordBatch calls (per tenant) whose batch id had been recorded before.",
)

# Shared by both TopAdapters scripts. Rows are compared by value (`higher`: larger is
# better), then more requests, then the adapter name first in byte order -- whatever
# locale the server's strcoll follows, so not with Lua's `<` on strings, and 8 bytes per
# string.byte call because with many ties this comparison is most of the work. The best
# `limit` rows are kept sorted; most rows take one comparison with the worst kept, and
# none allocates anything unless it is kept.
_TOP_K = """
local byte, min, floor, insert = string.byte, math.min, math.floor, table.insert
local function before(a, b)
  if a == b then return false end
  for i = 1, min(#a, #b), 8 do
    local a1, a2, a3, a4, a5, a6, a7, a8 = byte(a, i, i + 7)
    local b1, b2, b3, b4, b5, b6, b7, b8 = byte(b, i, i + 7)
    if a1 ~= b1 then return (a1 or -1) < (b1 or -1) end
    if a2 ~= b2 then return (a2 or -1) < (b2 or -1) end
    if a3 ~= b3 then return (a3 or -1) < (b3 or -1) end
    if a4 ~= b4 then return (a4 or -1) < (b4 or -1) end
    if a5 ~= b5 then return (a5 or -1) < (b5 or -1) end
    if a6 ~= b6 then return (a6 or -1) < (b6 or -1) end
    if a7 ~= b7 then return (a7 or -1) < (b7 or -1) end
    if a8 ~= b8 then return (a8 or -1) < (b8 or -1) end
  end
  return #a < #b
end
local top = {}
local function better(a, v, req, row)
  if v ~= row[2] then
    if higher then return v > row[2] end
    return v < row[2]
  end
  if req ~= row[3] then return req > row[3] end
  return before(a, row[1])
end
local function offer(a, v, req)
  local n = #top
  if n == limit and not better(a, v, req, top[n]) then return end
  local lo, hi = 1, n + 1
  while lo < hi do
    local mid = floor((lo + hi) / 2)
    if better(a, v, req, top[mid]) then hi = mid else lo = mid + 1 end
  end
  insert(top, lo, {a, v, req})
  if #top > limit then top[#top] = nil end
end
"""

# TopAdapters by a metric of the rank records, inside Redis so that 10,000 adapters' sums
# never cross the wire. KEYS: the window's rank hashes. ARGV: metric, limit, min_requests.
# Only the record's leading doubles the metric needs are unpacked. Returns [adapter,
# value, requests, ...], best first.
_TOP = (
    """
local metric, limit, minreq = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local higher = true
local sunpack, call = struct.unpack, redis.call
"""
    + _TOP_K
    + """
local N, X, Y = {}, {}, {}
for k = 1, #KEYS do
  local flat = call('HGETALL', KEYS[k])
  if metric == 'requests' then
    for j = 1, #flat, 2 do
      local a = flat[j]
      N[a] = (N[a] or 0) + sunpack('<d', flat[j + 1])
    end
  elseif metric == 'success_rate' then
    for j = 1, #flat, 2 do
      local a = flat[j]
      local n, ok = sunpack('<dd', flat[j + 1])
      N[a], X[a] = (N[a] or 0) + n, (X[a] or 0) + ok
    end
  elseif metric == 'tokens_per_second' then
    for j = 1, #flat, 2 do
      local a = flat[j]
      local n, _, ct, ls = sunpack('<dddd', flat[j + 1])
      N[a], X[a], Y[a] = (N[a] or 0) + n, (X[a] or 0) + ct, (Y[a] or 0) + ls
    end
  else  -- avg_rating
    for j = 1, #flat, 2 do
      local a = flat[j]
      local n, _, _, _, rn, rs = sunpack('<dddddd', flat[j + 1])
      N[a], X[a], Y[a] = (N[a] or 0) + n, (X[a] or 0) + rn, (Y[a] or 0) + rs
    end
  end
end
for a, req in pairs(N) do
  if req >= minreq then
    local v
    if metric == 'requests' then
      if req > 0 then v = req end
    elseif metric == 'success_rate' then
      if req > 0 then v = X[a] / req end
    elseif metric == 'tokens_per_second' then
      if req > 0 then
        v = 0
        if Y[a] > 0 then v = X[a] / Y[a] end
      end
    elseif X[a] > 0 then  -- avg_rating: only adapters with ratings
      v = Y[a] / X[a]
    end
    if v then offer(a, v, req) end
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
)

# TopAdapters by p95 latency: each adapter's sketch merged over its series and over the
# window's buckets it has requests in, and its exact sketch p95 (the bin of rank
# floor(0.95 (n - 1)), as LatencySketch.quantile) -- all inside Redis. KEYS: the window's
# rank hashes. ARGV: limit, min_requests, then per bucket the prefix of its sketch hashes
# ("...:s:"); the sketch hashes are named from those prefixes and the adapter names in the
# rank hashes (the tenant's own keys: same hash tag, so the same cluster slot). Returns
# [adapter, bin, requests, ...], best (lowest bin) first.
# Pruning, exact: the coarse histograms in the rank records say in which coarse bin each
# adapter's p95 lies (coarse bins are runs of sketch bins, so the rank walk over coarse
# counts stops in the coarse bin that holds the sketch p95). Adapters are read coarse bin
# by coarse bin, lowest first -- those whose records lack a histogram (written by an
# earlier build) before all others -- and reading stops once the top is full and its
# worst bin is at most the upper edge of the coarse bin just read: every adapter left has
# a p95 bin above that edge, so it cannot enter or tie.
_COARSE_WALK = "\n".join(
    [
        "local function coarse_group({})".format(
            ", ".join(f"c{i}" for i in range(1, len(COARSE_EDGES) + 2))
        ),
        "  local rank = floor(0.95 * ({} - 1))".format(
            " + ".join(f"c{i}" for i in range(1, len(COARSE_EDGES) + 2))
        ),
        "  local seen = 0",
        *(
            f"  seen = seen + c{i}; if seen > rank then return {i + 1} end"
            for i in range(1, len(COARSE_EDGES) + 2)
        ),
        "  return 1",
        "end",
        "local EDGES = {{{}}}".format(", ".join(str(e) for e in COARSE_EDGES)),
        f"local NR, NC = {len(RANK_STATS)}, {len(COARSE_EDGES) + 1}",
    ]
)
_TOP_P95 = (
    """
local limit, minreq = tonumber(ARGV[1]), tonumber(ARGV[2])
local higher = false
local sunpack, tonum, call, find, sub = struct.unpack, tonumber, redis.call, string.find, string.sub
"""
    + _TOP_K
    + _COARSE_WALK
    + """
local coarse_fmt = '<' .. string.rep('x', 8 * NR) .. string.rep('d', NC)
local N, active, R = {}, {}, {}
for k = 1, #KEYS do
  local flat = call('HGETALL', KEYS[k])
  for j = 1, #flat, 2 do
    local a, rec = flat[j], flat[j + 1]
    local n = sunpack('<d', rec)
    if n > 0 then  -- active[a]: the bucket, or a list of them
      local b = active[a]
      if not b then
        active[a] = k
      elseif type(b) == 'number' then
        active[a] = {b, k}
      else
        b[#b + 1] = k
      end
      N[a] = (N[a] or 0) + n
      -- R[a]: its record's coarse counts (the record itself while there is one), or
      -- false when a record has none
      local have = R[a]
      if #rec < 8 * (NR + NC) then
        R[a] = false
      elseif have == nil then
        R[a] = rec
      elseif have then
        if type(have) == 'string' then have = {sunpack(coarse_fmt, have)} end
        local add = {sunpack(coarse_fmt, rec)}
        for i = 1, NC do have[i] = have[i] + add[i] end
        R[a] = have
      end
    end
  end
end
local groups = {}
for g = 1, NC + 1 do groups[g] = {} end
for a, req in pairs(N) do
  if req >= minreq then
    local have, g = R[a], 1
    if type(have) == 'string' then
      g = coarse_group(sunpack(coarse_fmt, have))
    elseif have then
      g = coarse_group(unpack(have, 1, NC))
    end
    local list = groups[g]
    list[#list + 1] = a
  end
end
local ZERO = -1e9
local function bin_of(f)  -- "<version>|<experiment>|<variant>|<bin>" -> bin
  local s = sub(f, find(f, '|[^|]*$') + 1)
  if s == 'z' then return ZERO end
  return tonum(s)
end
-- The adapter's (bin, count) pairs, in bs/cs[1..n] (reused): a few are sorted in place,
-- many are merged in a table and sorted by table.sort. Equal bins may stay apart: the walk
-- to the rank reaches the same bin either way.
local bs, cs = {}, {}
local function p95_bin(n, total)
  if n <= 24 then
    for i = 2, n do
      local b, c, j = bs[i], cs[i], i - 1
      while j > 0 and bs[j] > b do
        bs[j + 1], cs[j + 1] = bs[j], cs[j]
        j = j - 1
      end
      bs[j + 1], cs[j + 1] = b, c
    end
  else
    local counts, bins = {}, {}
    for i = 1, n do
      local b = bs[i]
      if counts[b] then
        counts[b] = counts[b] + cs[i]
      else
        counts[b] = cs[i]
        bins[#bins + 1] = b
      end
    end
    table.sort(bins)
    n = #bins
    for i = 1, n do bs[i], cs[i] = bins[i], counts[bins[i]] end
  end
  local rank, seen = floor(0.95 * (total - 1)), 0
  for i = 1, n do
    seen = seen + cs[i]
    if seen > rank then return bs[i] end
  end
end
for g = 1, NC + 1 do
  for _, a in ipairs(groups[g]) do
    local buckets = active[a]
    if type(buckets) == 'number' then buckets = {buckets} end
    local n, total = 0, 0
    for b = 1, #buckets do
      local flat = call('HGETALL', ARGV[buckets[b] + 2] .. a)
      for j = 1, #flat, 2 do
        local c = tonum(flat[j + 1])
        n, total = n + 1, total + c
        bs[n], cs[n] = bin_of(flat[j]), c
      end
    end
    if total > 0 then offer(a, p95_bin(n, total), N[a]) end
  end
  if g >= 2 and g <= NC and #top == limit and top[limit][2] <= EDGES[g - 1] then break end
end
local out = {}
for _, r in ipairs(top) do
  out[#out + 1] = r[1]
  out[#out + 1] = r[2] == ZERO and 'z' or string.format('%d', r[2])
  out[#out + 1] = r[3]
end
return out
"""
)


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

    def add_record(self, raw: bytes) -> None:
        """Add a stored counter record (ingest.COUNTERS, as little-endian doubles)."""
        for stat, value in zip(COUNTERS, unpack(raw), strict=False):
            if value:
                if stat in self._INT:
                    name = self._INT[stat]
                    setattr(self, name, getattr(self, name) + int(value))
                elif stat in self._FLOAT:
                    name = self._FLOAT[stat]
                    setattr(self, name, getattr(self, name) + value)
                else:
                    code = stat[2:]
                    self.errors_by_code[code] = self.errors_by_code.get(code, 0) + int(value)

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

    @property
    def latency_stddev(self) -> float:
        """Sample standard deviation (n - 1) of the latencies; 0 with fewer than two."""
        n = self.requests
        if n < 2:
            return 0.0
        var = (self.latency_sum_sq - self.latency_sum**2 / n) / (n - 1)
        return math.sqrt(max(var, 0.0))

    @property
    def ttft_stddev(self) -> float:
        """Sample standard deviation (n - 1) of the times to first token."""
        n = self.ttft_count
        if n < 2:
            return 0.0
        var = (self.ttft_sum_sq - self.ttft_sum**2 / n) / (n - 1)
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
    ttft = event.ttft_seconds
    return event_reason(
        label_reason(event.tenant, event.adapter, event.version, event.experiment, event.variant),
        event.time is not None,
        math.nan if event.time is None else event.time,
        KINDS.get(event.kind, -1),
        STATUS_NUMBERS.get(event.status, 0),
        event.latency_seconds,
        ttft is not None,
        math.nan if ttft is None else ttft,
        event.prompt_tokens,
        event.completion_tokens,
        event.rating,
        now,
        settings,
    )


def _clamp(tokens: int) -> int:
    """Token counts beyond int64 (possible in a Python Event) as the nearest that is still
    rejected for the same reason."""
    return max(min(tokens, 2**62), -(2**62))


def events_to_columns(events: Sequence[Event]) -> Columns:
    nan = math.nan
    return Columns.from_rows(
        [
            (
                e.tenant,
                e.adapter,
                e.version,
                e.experiment,
                e.variant,
                e.time is not None,
                nan if e.time is None else e.time,
                KINDS.get(e.kind, -1),
                STATUS_NUMBERS.get(e.status, 0),
                e.latency_seconds,
                e.ttft_seconds is not None,
                nan if e.ttft_seconds is None else e.ttft_seconds,
                _clamp(e.prompt_tokens),
                _clamp(e.completion_tokens),
                e.rating,
            )
            for e in events
        ]
    )


class AnalyticsCore:
    def __init__(self, settings: AnalyticsSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._script = redis.register_script(ingest.RECORD_SCRIPT)
        self._top = redis.register_script(_TOP)
        self._top_p95 = redis.register_script(_TOP_P95)
        # Names already checked, and series prefixes already built (bounded; see ingest).
        self._labels: dict = {}
        self._series: dict = {}

    async def ping(self) -> None:
        await self.redis.ping()

    # --- ingest -------------------------------------------------------------------------

    async def record_batch(
        self, batch_id: str, events: Sequence[Event], *, now: float | None = None
    ) -> RecordResult:
        self._check_batch(batch_id, len(events))
        return await self.record_columns(batch_id, events_to_columns(events), now=now)

    def _check_batch(self, batch_id: str, size: int) -> None:
        if not _BATCH_ID.fullmatch(batch_id or ""):
            raise InvalidArgument(
                "batch_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                reason="INVALID_BATCH_ID",
            )
        limit = self.settings.max_batch_events
        if size > limit:
            raise InvalidArgument(
                f"batch has {size} events, at most {limit} are allowed",
                reason="BATCH_TOO_LARGE",
                max_batch_events=str(limit),
            )

    async def record_columns(
        self, batch_id: str, columns: Columns, *, now: float | None = None
    ) -> RecordResult:
        """record_batch for a batch already in columns (the gRPC path reads them straight
        from the protobuf)."""
        self._check_batch(batch_id, len(columns))
        now = time.time() if now is None else now
        times = np.asarray(columns.time, np.float64)[np.asarray(columns.has_time, bool)]
        if times.size:
            INGEST_LAG.observe(max(0.0, now - float(times.min())))
        batch = ingest.Aggregated(columns, now, self.settings, self._labels)
        rejected = batch.rejected
        duplicate = False
        if batch.accepted:
            writes = batch.tenant_writes(batch_id, self._series)
            ttl = self.settings.batch_id_ttl_seconds
            try:
                if len(writes) == 1:  # the usual case: no pipeline, one round trip
                    w = writes[0]
                    applied = [await self._script(keys=w.keys, args=w.args(ttl))]
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for w in writes:
                            await self._script(keys=w.keys, args=w.args(ttl), client=pipe)
                        applied = await pipe.execute()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
                raise Unavailable(
                    "the analytics store is unavailable; retry with the same batch_id",
                    reason="STORE_UNAVAILABLE",
                ) from err
            fresh = [w.events for w, a in zip(writes, applied, strict=True) if int(a)]
            DUPLICATE_BATCHES.inc(len(applied) - len(fresh))
            EVENTS_ACCEPTED.inc(sum(fresh))
            duplicate = not fresh
        for _, reason in rejected:
            EVENTS_REJECTED.labels(reason).inc()
        return RecordResult(accepted=batch.accepted, rejected=rejected, duplicate=duplicate)

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
        keys = [key(tenant, "an", tag, b, "rank") for b in win.buckets]
        try:
            if metric == "p95_latency":
                prefixes = [key(tenant, "an", tag, b, "s", "") for b in win.buckets]
                flat = await self._top_p95(keys=keys, args=[limit, min_requests, *prefixes])
            else:
                flat = await self._top(keys=keys, args=[metric, limit, min_requests])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            raise Unavailable(
                "the analytics store is unavailable", reason="STORE_UNAVAILABLE"
            ) from err
        if metric == "p95_latency":  # bins to the values LatencySketch.quantile reports
            values = [bucket_value(flat[i].decode()) for i in range(1, len(flat), 3)]
        else:
            values = [float(flat[i]) for i in range(1, len(flat), 3)]
        return [
            Ranked(flat[i].decode(), v, int(flat[i + 2]))
            for i, v in zip(range(0, len(flat), 3), values, strict=True)
        ], win


def _fold_counters(m: Metrics, reply: dict[bytes, bytes], series: SeriesFilter) -> None:
    for raw_field, raw in reply.items():
        version, experiment, variant, stat = raw_field.decode().split("|")
        if series.matches(version, experiment, variant):
            if stat == "*":
                m.add_record(raw)
            else:  # written before records existed: one field per stat
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
