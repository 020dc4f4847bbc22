"""The feedback workflow for the caller's tenant: lease the next output to review, answer
it, export the answers as a TRL dataset (JSON Lines)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, Field

from gateway.deps import GatewayDep, ReviewerDep
from gateway.fields import Identifier, Instant, Int32
from gateway.protojson import proto_to_json
from loraplex.activelearning.v1 import activelearning_service_pb2 as alpb
from services.common.errors import InvalidArgument

router = APIRouter(prefix="/feedback", tags=["feedback"])

FORMATS = {
    "sft": alpb.DATASET_FORMAT_SFT,
    "dpo": alpb.DATASET_FORMAT_DPO,
    "kto": alpb.DATASET_FORMAT_KTO,
}
Reviewer = Annotated[
    str, Query(max_length=256, description="who reviews; an item is never shown twice")
]


class Pairwise(BaseModel):
    other_item_id: Identifier
    preferred_item_id: Identifier


class FeedbackBody(BaseModel):
    """Exactly one of rating (1-5), thumbs ("up"/"down"), pairwise, corrected_text."""

    item_id: Identifier
    reviewer: Identifier
    lease_id: Identifier
    rating: Int32 | None = None
    thumbs: Literal["up", "down"] | None = None
    pairwise: Pairwise | None = None
    corrected_text: str | None = None
    comment: str = Field(default="", max_length=4096)


@router.get("/next")
async def next_item(tenant: ReviewerDep, gateway: GatewayDep, reviewer: Reviewer) -> dict[str, Any]:
    """Leases the most uncertain queued output to the reviewer; {"item": null} when none."""
    stub = gateway.require_activelearning()
    reply = await stub.NextForFeedback(
        alpb.NextForFeedbackRequest(tenant=tenant, reviewer=reviewer), timeout=gateway.timeout
    )
    if not reply.HasField("item"):
        return {"item": None}
    out = proto_to_json(reply)
    out.setdefault("alternative", None)
    return out


@router.post("")
async def submit_feedback(
    body: FeedbackBody, tenant: ReviewerDep, gateway: GatewayDep
) -> dict[str, Any]:
    request = alpb.SubmitFeedbackRequest(
        tenant=tenant,
        item_id=body.item_id,
        reviewer=body.reviewer,
        lease_id=body.lease_id,
        comment=body.comment,
    )
    given = [
        name
        for name in ("rating", "thumbs", "pairwise", "corrected_text")
        if getattr(body, name) is not None
    ]
    if len(given) != 1:
        raise InvalidArgument(
            "give exactly one of rating, thumbs, pairwise, corrected_text",
            reason="MISSING_FEEDBACK" if not given else "AMBIGUOUS_FEEDBACK",
        )
    if body.rating is not None:
        request.rating = body.rating
    elif body.thumbs is not None:
        request.thumbs = alpb.THUMBS_UP if body.thumbs == "up" else alpb.THUMBS_DOWN
    elif body.pairwise is not None:
        request.pairwise.CopyFrom(alpb.PairwisePreference(**body.pairwise.model_dump()))
    else:
        request.corrected_text = body.corrected_text or ""
    stub = gateway.require_activelearning()
    reply = await stub.SubmitFeedback(request, timeout=gateway.timeout)
    return proto_to_json(reply)


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


@router.get("/export")
async def export(
    tenant: ReviewerDep,
    gateway: GatewayDep,
    format: Annotated[str, Query(description="sft, dpo or kto")] = "sft",
    adapter: str = "",
    since: Annotated[Instant | None, Query(description="ISO 8601 or Unix seconds")] = None,
    until: Annotated[Instant | None, Query(description="ISO 8601 or Unix seconds")] = None,
) -> Response:
    """JSON Lines that datasets.load_dataset("json", data_files=...) reads."""
    if format not in FORMATS:
        raise InvalidArgument(
            f"unknown format {format!r}; use one of {', '.join(FORMATS)}", reason="UNKNOWN_FORMAT"
        )
    request = alpb.ExportDatasetRequest(
        tenant=tenant,
        format=FORMATS[format],
        adapter=adapter,
        start_time=_timestamp(since),
        end_time=_timestamp(until),
    )
    stub = gateway.require_activelearning()
    reply = await stub.ExportDataset(request, timeout=gateway.timeout)
    headers = {
        "X-Loraplex-Rows": str(reply.rows),
        "X-Loraplex-Truncated": "true" if reply.truncated else "false",
        "Content-Disposition": f'attachment; filename="{tenant}-{format}.jsonl"',
    }
    return Response(reply.jsonl, media_type="application/x-ndjson", headers=headers)


@router.get("/stats")
async def stats(tenant: ReviewerDep, gateway: GatewayDep) -> dict[str, Any]:
    """Pool and queue sizes, feedback counts, Krippendorff's alpha."""
    stub = gateway.require_activelearning()
    reply = await stub.QueueStats(alpb.QueueStatsRequest(tenant=tenant), timeout=gateway.timeout)
    out = proto_to_json(reply)
    for name in ("rating_alpha", "thumbs_alpha"):
        out.setdefault(name, None)
    return out
