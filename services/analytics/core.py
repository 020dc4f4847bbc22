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
requests per error code, in RequestStatus order). Sketch bins are those of
services.analytics.sketch. Every event is written to its minute and its hour bucket
(the hour bucket is the roll-up, done by the same script), and keys expire at the end of
their bucket plus retention.

Idempotency: one Lua script per (tenant, batch) does SET NX on the batch key and, only if
that succeeded, all of the batch's increments. A script runs atomically and reaches the AOF
as one MULTI/EXEC, so after any crash either the batch key and all its counts are there or
none of them are: a retry of an unacknowledged batch is counted exactly once. The write
path itself is in services.analytics.ingest; the scripts are in lua/.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import prometheus_client
import redis.asyncio as aioredis

from services.analytics import ingest
from services.analytics.ingest import (
    COARSE_EDGES,
    COUNTERS,
    KINDS,
    RANK_STATS,
    STATUS_NUMBERS,
    Columns,
    unpack,
)
from services.analytics.scripts import lua
from services.analytics.settings import AnalyticsSettings
from services.analytics.sketch import LatencySketch, bucket_value
from services.common.errors import InvalidArgument
from services.common.keys import key
from services.common.names import RECORD_ID, check_adapter_name, check_tenant
from services.common.redis import run_script_many

MINUTE, HOUR = 60, 3600
RESOLUTIONS = {MINUTE: "m", HOUR: "h"}
QUANTILES = (0.5, 0.95, 0.99)
RANK_METRICS = ("success_rate", "p95_latency", "requests", "avg_rating", "tokens_per_second")
MAX_TOP_LIMIT = 1000
MAX_POINTS = 2000


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
    """Why an event cannot be counted, or None when it can (the batch validator, on one)."""
    rejected = ingest.Aggregated(events_to_columns([event]), now, settings, {}).rejected
    return rejected[0][1] if rejected else None


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
        self._script = redis.register_script(lua("record"))
        self._top = redis.register_script(lua("top_adapters"))
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
        if not RECORD_ID.fullmatch(batch_id or ""):
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
            # A Redis outage is UNAVAILABLE (the shared interceptor): retried under the same
            # batch id, it is counted once.
            if len(writes) == 1:  # the usual case: no pipeline, one round trip
                w = writes[0]
                applied = [await self._script(keys=w.keys, args=w.args(ttl))]
            else:
                calls = [(w.keys, w.args(ttl)) for w in writes]
                applied = await run_script_many(self.redis, self._script, calls)
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
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, hkey in pipe_calls:
                pipe.hgetall(hkey)
            return await pipe.execute()

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
        p95 = metric == "p95_latency"  # only the p95 reads sketches
        prefixes = [key(tenant, "an", tag, b, "s", "") for b in win.buckets] if p95 else []
        coarse_bins = len(COARSE_EDGES) + 1
        args = [metric, limit, min_requests, len(RANK_STATS), coarse_bins, *prefixes]
        flat = await self._top(keys=keys, args=args)
        if p95:  # bins to the values LatencySketch.quantile reports
            values = [bucket_value(flat[i].decode()) for i in range(1, len(flat), 3)]
        else:
            values = [float(flat[i]) for i in range(1, len(flat), 3)]
        return [
            Ranked(flat[i].decode(), v, int(flat[i + 2]))
            for i, v in zip(range(0, len(flat), 3), values, strict=True)
        ], win


def _fold_counters(m: Metrics, reply: dict[bytes, bytes], series: SeriesFilter) -> None:
    for raw_field, raw in reply.items():
        version, experiment, variant, _ = raw_field.decode().split("|")
        if series.matches(version, experiment, variant):
            m.add_record(raw)


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
