"""Per-variant aggregates from the analytics service (GetAdapterMetrics over gRPC).

The gateway tags every completion it serves inside an experiment with the experiment key and
the variant name; the analytics service keeps counts, sums and sums of squares per
(adapter, version, experiment, variant). For each variant this asks GetAdapterMetrics for
its adapter(s) with the filter {experiment, variant} over the experiment's running time and
turns the answer into `stats.Aggregate`s (observations, sum, sum of squares):

    metric (kind)                         observation   from AdapterMetrics
    success, success_rate (rate)          request       successes of requests
    latency[_seconds|_ms] (mean)          request       latency mean and stddev
    ttft[_seconds|_ms],                   request with  time_to_first_token count, mean
      time_to_first_token_seconds (mean)  a first token and stddev
    rating (mean)                         rating        rating count, mean and stddev

Completion tokens are not among them: the analytics service keeps their sum but no sum of
squares, so their variance is unknown; record them per user with RecordOutcomes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from services.common.errors import Unavailable
from services.experiments.model import Experiment, Metric, MetricKind, Status
from services.experiments.stats import Aggregate


@dataclass(frozen=True)
class _Source:
    kind: MetricKind
    unit: str  # what one observation is
    # AdapterMetrics -> (observations, mean, sample stddev); rates: (requests, successes, 0)
    read: Callable[[apb.AdapterMetrics], tuple[int, float, float]]
    scale: float = 1.0  # seconds -> milliseconds


def _success(m: apb.AdapterMetrics) -> tuple[int, float, float]:
    return m.requests, float(m.successes), 0.0


def _latency(m: apb.AdapterMetrics) -> tuple[int, float, float]:
    return m.requests, m.latency_mean_seconds, m.latency_stddev_seconds


def _ttft(m: apb.AdapterMetrics) -> tuple[int, float, float]:
    return (
        m.time_to_first_token_count,
        m.time_to_first_token_mean_seconds,
        m.time_to_first_token_stddev_seconds,
    )


def _rating(m: apb.AdapterMetrics) -> tuple[int, float, float]:
    return m.rating_count, m.rating_mean, m.rating_stddev


SOURCES: dict[str, _Source] = {
    "success": _Source(MetricKind.RATE, "request", _success),
    "success_rate": _Source(MetricKind.RATE, "request", _success),
    "latency": _Source(MetricKind.MEAN, "request", _latency),
    "latency_seconds": _Source(MetricKind.MEAN, "request", _latency),
    "latency_ms": _Source(MetricKind.MEAN, "request", _latency, 1000.0),
    "ttft": _Source(MetricKind.MEAN, "request", _ttft),
    "ttft_seconds": _Source(MetricKind.MEAN, "request", _ttft),
    "ttft_ms": _Source(MetricKind.MEAN, "request", _ttft, 1000.0),
    "time_to_first_token_seconds": _Source(MetricKind.MEAN, "request", _ttft),
    "rating": _Source(MetricKind.MEAN, "rating", _rating),
}
# Names people use for a metric analytics cannot give (no variance): a note says why.
NOT_FROM_ANALYTICS = {"tokens", "completion_tokens", "prompt_tokens", "total_tokens"}


def source_of(metric: Metric) -> _Source | None:
    found = SOURCES.get(metric.name)
    return found if found is not None and found.kind == metric.kind else None


def aggregate(source: _Source, metrics: apb.AdapterMetrics) -> Aggregate:
    n, mean, sd = source.read(metrics)
    if source.kind == MetricKind.RATE:
        return Aggregate.rate(n, mean)  # mean holds the conversions here
    mean, sd = mean * source.scale, sd * source.scale
    # sum and sum of squares back from n, mean and the sample (n - 1) standard deviation
    sum_squares = (n - 1) * sd * sd + n * mean * mean if n else 0.0
    return Aggregate(n, n * mean, sum_squares)


def _add(a: Aggregate, b: Aggregate) -> Aggregate:
    return Aggregate(a.n + b.n, a.sum + b.sum, a.sum_squares + b.sum_squares)


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class AnalyticsSource:
    def __init__(
        self,
        addr: str,
        timeout: float = 10.0,
        max_window_seconds: float = 30 * 24 * 3600,
        base_model_name: str = "",
    ) -> None:
        self.addr = addr
        self.timeout = timeout
        self.max_window = max_window_seconds
        self.base_model_name = base_model_name
        self._channel: grpc.aio.Channel | None = None
        self._stub: apb_grpc.AnalyticsServiceStub | None = None

    def _analytics(self) -> apb_grpc.AnalyticsServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.addr)
            self._stub = apb_grpc.AnalyticsServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    def window(self, exp: Experiment, now: float | None = None) -> tuple[float, float, bool]:
        """(start, end, capped): from the start of the current bucket version to the stop
        (or now), at most the analytics retention."""
        now = time.time() if now is None else now
        start = max(exp.start_time, exp.bucket_time)
        end = exp.stop_time if exp.status == Status.STOPPED and exp.stop_time else now
        end = max(end, start)
        capped = end - start > self.max_window
        return (end - self.max_window if capped else start), end, capped

    async def aggregates(
        self, exp: Experiment, metrics: list[Metric]
    ) -> tuple[dict[str, list[Aggregate]], list[str]]:
        """Per metric (of those source_of() knows), one Aggregate per variant; and notes."""
        notes: list[str] = []
        wanted = [(m, source_of(m)) for m in metrics]
        wanted = [(m, s) for m, s in wanted if s is not None]
        empty = {m.name: [Aggregate(0, 0.0, 0.0)] * len(exp.variants) for m, _ in wanted}
        if not wanted or not exp.start_time:
            return empty, notes
        start, end, capped = self.window(exp)
        if capped:
            notes.append(
                f"the experiment has run longer than the analytics retention: analytics "
                f"metrics cover only the last {self.max_window / 86400:g} days"
            )
        calls = []
        for variant in exp.variants:
            refs = [(a.name, a.version) for a in variant.adapters]
            if not refs:
                refs = [(self.base_model_name, 0)]
            calls.append([self._metrics(exp, variant.name, n, v, start, end) for n, v in refs])
        try:
            replies = await asyncio.gather(*(asyncio.gather(*c) for c in calls))
        except grpc.aio.AioRpcError as err:
            raise Unavailable(
                f"the analytics service did not answer ({err.code().name}); results need "
                "its per-variant aggregates",
                reason="ANALYTICS_UNAVAILABLE",
            ) from err
        out = dict(empty)
        for metric, source in wanted:
            per_variant = []
            for answers in replies:
                total = Aggregate(0, 0.0, 0.0)
                for reply in answers:
                    total = _add(total, aggregate(source, reply.metrics))
                per_variant.append(total)
            out[metric.name] = per_variant
        return out, notes

    async def _metrics(
        self, exp: Experiment, variant: str, adapter: str, version: int, start: float, end: float
    ) -> apb.GetAdapterMetricsResponse:
        window = Duration()
        window.FromNanoseconds(int((end - start) * 1e9))
        series = apb.SeriesFilter(experiment=exp.key, variant=variant)
        if version:
            series.version = version
        request = apb.GetAdapterMetricsRequest(
            tenant=exp.tenant,
            adapter=adapter,
            window=window,
            end_time=_timestamp(end),
            filter=series,
        )
        return await self._analytics().GetAdapterMetrics(request, timeout=self.timeout)
