"""gRPC servicer: translates protos to AnalyticsCore calls and back. No logic of its own."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.analytics.v1 import analytics_service_pb2 as pb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as pb_grpc
from services.analytics.core import HOUR, MINUTE, AnalyticsCore, Metrics, SeriesFilter
from services.analytics.ingest import KIND_FEEDBACK, KIND_NONE, KIND_REQUEST, Columns

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AnalyticsService"].full_name
# RANK_METRIC_SUCCESS_RATE -> "success_rate", ... (the domain's RANK_METRICS)
_RANK = {
    v.number: v.name.removeprefix("RANK_METRIC_").lower()
    for v in pb.RankMetric.DESCRIPTOR.values
    if v.number != pb.RANK_METRIC_UNSPECIFIED
}
_RESOLUTION = {pb.RESOLUTION_MINUTE: MINUTE, pb.RESOLUTION_HOUR: HOUR}
_RESOLUTION_PB = {v: k for k, v in _RESOLUTION.items()}


_NAN = float("nan")


def columns_from_proto(events) -> Columns:
    """The batch as columns, in one pass: a few attribute reads per event, no objects.
    Statuses stay proto numbers; the validator rejects those the contract lacks."""
    rows = []
    add = rows.append
    for e in events:
        kind = e.WhichOneof("kind")
        adapter = e.adapter
        if e.HasField("time"):
            t = e.time
            has_time, when = True, t.seconds + t.nanos * 1e-9
        else:
            has_time, when = False, _NAN
        head = (e.tenant, adapter.name, adapter.version, e.experiment, e.variant, has_time, when)
        if kind == "request":
            r = e.request
            if r.HasField("time_to_first_token_seconds"):
                has_ttft, ttft = True, r.time_to_first_token_seconds
            else:
                has_ttft, ttft = False, _NAN
            add(
                (
                    *head,
                    KIND_REQUEST,
                    r.status,
                    r.latency_seconds,
                    has_ttft,
                    ttft,
                    r.prompt_tokens,
                    r.completion_tokens,
                    0.0,
                )
            )
        elif kind == "feedback":
            add((*head, KIND_FEEDBACK, 0, 0.0, False, _NAN, 0, 0, e.feedback.rating))
        else:
            add((*head, KIND_NONE, 0, 0.0, False, _NAN, 0, 0, 0.0))
    return Columns.from_rows(rows)


def series_filter(f: pb.SeriesFilter) -> SeriesFilter:
    return SeriesFilter(
        version=f.version if f.HasField("version") else None,
        experiment=f.experiment if f.HasField("experiment") else None,
        variant=f.variant if f.HasField("variant") else None,
    )


def metrics_proto(m: Metrics) -> pb.AdapterMetrics:
    p50, p95, p99 = m.sketch.quantiles((0.5, 0.95, 0.99))
    return pb.AdapterMetrics(
        requests=m.requests,
        successes=m.successes,
        errors=m.errors,
        errors_by_code=m.errors_by_code,
        success_rate=m.success_rate,
        prompt_tokens=m.prompt_tokens,
        completion_tokens=m.completion_tokens,
        latency_mean_seconds=m.latency_mean,
        latency_p50_seconds=p50,
        latency_p95_seconds=p95,
        latency_p99_seconds=p99,
        time_to_first_token_mean_seconds=m.ttft_mean,
        tokens_per_second=m.tokens_per_second,
        rating_count=m.rating_count,
        rating_mean=m.rating_mean,
        rating_stddev=m.rating_stddev,
        latency_stddev_seconds=m.latency_stddev,
        time_to_first_token_count=m.ttft_count,
        time_to_first_token_stddev_seconds=m.ttft_stddev,
    )


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _window(request) -> tuple[float | None, float | None]:
    window = request.window.ToNanoseconds() / 1e9 if request.HasField("window") else None
    end = request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else None
    return window, end


class AnalyticsServicer(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, core: AnalyticsCore) -> None:
        self.core = core

    async def RecordBatch(self, request: pb.RecordBatchRequest, context):
        result = await self.core.record_columns(
            request.batch_id, columns_from_proto(request.events)
        )
        return pb.RecordBatchResponse(
            accepted=result.accepted,
            rejected=[pb.RejectedEvent(index=i, reason=r) for i, r in result.rejected],
            rejected_by_reason=result.rejected_by_reason,
            duplicate=result.duplicate,
        )

    async def GetAdapterMetrics(self, request: pb.GetAdapterMetricsRequest, context):
        window, end = _window(request)
        metrics, win = await self.core.adapter_metrics(
            request.tenant, request.adapter, window, end, series_filter(request.filter)
        )
        return pb.GetAdapterMetricsResponse(
            adapter=request.adapter,
            metrics=metrics_proto(metrics),
            start_time=_timestamp(win.start),
            end_time=_timestamp(win.end),
            resolution=_RESOLUTION_PB[win.resolution],
        )

    async def TopAdapters(self, request: pb.TopAdaptersRequest, context):
        window, end = _window(request)
        ranked, _ = await self.core.top_adapters(
            request.tenant,
            _RANK.get(request.metric, ""),
            request.limit,
            window,
            end,
            request.min_requests,
        )
        return pb.TopAdaptersResponse(
            adapters=[
                pb.RankedAdapter(adapter=r.adapter, value=r.value, requests=r.requests)
                for r in ranked
            ]
        )

    async def GetTimeseries(self, request: pb.GetTimeseriesRequest, context):
        window, end = _window(request)
        points, win = await self.core.timeseries(
            request.tenant,
            request.adapter,
            window,
            end,
            _RESOLUTION.get(request.resolution),
            series_filter(request.filter),
        )
        return pb.GetTimeseriesResponse(
            resolution=_RESOLUTION_PB[win.resolution],
            points=[
                pb.TimeseriesPoint(start_time=_timestamp(start), metrics=metrics_proto(m))
                for start, m in points
            ],
        )
