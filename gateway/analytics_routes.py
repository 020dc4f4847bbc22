"""Per-adapter analytics for the caller's tenant (the product spec's REST endpoints)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query
from google.protobuf.duration_pb2 import Duration

from gateway.deps import GatewayDep, TenantDep
from gateway.fields import INT32_MAX, UINT32_MAX
from gateway.protojson import proto_to_json
from loraplex.analytics.v1 import analytics_service_pb2 as apb
from services.common.errors import InvalidArgument

router = APIRouter(prefix="/analytics", tags=["analytics"])

_WINDOW = re.compile(r"^(?P<n>[1-9][0-9]{0,6})(?P<unit>[smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_METRICS = {
    "success_rate": apb.RANK_METRIC_SUCCESS_RATE,
    "p95_latency": apb.RANK_METRIC_P95_LATENCY,
    "requests": apb.RANK_METRIC_REQUESTS,
    "avg_rating": apb.RANK_METRIC_AVG_RATING,
    "tokens_per_second": apb.RANK_METRIC_TOKENS_PER_SECOND,
}

Window = Annotated[str, Query(description="e.g. 15m, 1h, 7d")]


def parse_window(window: str) -> Duration:
    match = _WINDOW.fullmatch(window)
    if match is None:
        raise InvalidArgument(
            f"window {window!r} must be a number and a unit s, m, h or d (e.g. 1h)",
            reason="BAD_WINDOW",
        )
    return Duration(seconds=int(match["n"]) * _SECONDS[match["unit"]])


Version = Annotated[
    int | None, Query(ge=1, le=UINT32_MAX, description="only this adapter version's requests")
]
_RESOLUTIONS = {"minute": apb.RESOLUTION_MINUTE, "hour": apb.RESOLUTION_HOUR}


def series_filter(version: int | None) -> apb.SeriesFilter:
    return apb.SeriesFilter(version=version) if version is not None else apb.SeriesFilter()


@router.get("/adapters/{adapter_id}")
async def adapter_metrics(
    adapter_id: str,
    tenant: TenantDep,
    gateway: GatewayDep,
    window: Window = "1h",
    version: Version = None,
) -> dict[str, Any]:
    request = apb.GetAdapterMetricsRequest(
        tenant=tenant,
        adapter=adapter_id,
        window=parse_window(window),
        filter=series_filter(version),
    )
    reply = await gateway.require_analytics().GetAdapterMetrics(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.get("/top-performers")
async def top_performers(
    tenant: TenantDep,
    gateway: GatewayDep,
    metric: Annotated[str, Query(description=", ".join(_METRICS))] = "success_rate",
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    window: Window = "1h",
    min_requests: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> dict[str, Any]:
    if metric not in _METRICS:
        raise InvalidArgument(
            f"metric must be one of {', '.join(_METRICS)}", reason="BAD_METRIC", metric=metric
        )
    request = apb.TopAdaptersRequest(
        tenant=tenant,
        metric=_METRICS[metric],
        limit=limit,
        window=parse_window(window),
        min_requests=min_requests,
    )
    reply = await gateway.require_analytics().TopAdapters(request, timeout=gateway.timeout)
    return {"metric": metric, "window": window, **proto_to_json(reply)}


@router.get("/adapters/{adapter_id}/timeseries")
async def adapter_timeseries(
    adapter_id: str,
    tenant: TenantDep,
    gateway: GatewayDep,
    window: Window = "1h",
    version: Version = None,
    resolution: Annotated[str, Query(description="minute or hour; default by window")] = "",
) -> dict[str, Any]:
    """One point per bucket, oldest first, empty buckets included."""
    if resolution and resolution not in _RESOLUTIONS:
        raise InvalidArgument(
            f"resolution must be one of {', '.join(_RESOLUTIONS)}", reason="BAD_RESOLUTION"
        )
    request = apb.GetTimeseriesRequest(
        tenant=tenant,
        adapter=adapter_id,
        window=parse_window(window),
        resolution=_RESOLUTIONS.get(resolution, apb.RESOLUTION_UNSPECIFIED),
        filter=series_filter(version),
    )
    reply = await gateway.require_analytics().GetTimeseries(request, timeout=gateway.timeout)
    return proto_to_json(reply)
