"""gRPC servicer: translates protos to ActiveLearningCore calls and back. No logic of its own."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.activelearning.v1 import activelearning_service_pb2 as pb
from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as pb_grpc
from loraplex.common.v1 import common_pb2
from services.activelearning.core import ActiveLearningCore, CandidateIn, Feedback
from services.activelearning.export import DatasetFormat
from services.activelearning.queue import Item
from services.activelearning.scores import UncertaintyMethod
from services.activelearning.selection import Strategy

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ActiveLearningService"].full_name

METHODS = {
    pb.UNCERTAINTY_METHOD_ENTROPY: UncertaintyMethod.ENTROPY,
    pb.UNCERTAINTY_METHOD_MAX_ENTROPY: UncertaintyMethod.MAX_ENTROPY,
    pb.UNCERTAINTY_METHOD_LEAST_CONFIDENCE: UncertaintyMethod.LEAST_CONFIDENCE,
    pb.UNCERTAINTY_METHOD_MARGIN: UncertaintyMethod.MARGIN,
    pb.UNCERTAINTY_METHOD_NLL: UncertaintyMethod.NLL,
    pb.UNCERTAINTY_METHOD_SAMPLE_JACCARD: UncertaintyMethod.SAMPLE_JACCARD,
    pb.UNCERTAINTY_METHOD_SAMPLE_ROUGE_L: UncertaintyMethod.SAMPLE_ROUGE_L,
    pb.UNCERTAINTY_METHOD_SAMPLE_CLUSTERS: UncertaintyMethod.SAMPLE_CLUSTERS,
    pb.UNCERTAINTY_METHOD_SAMPLE_CLUSTER_ENTROPY: UncertaintyMethod.SAMPLE_CLUSTER_ENTROPY,
    pb.UNCERTAINTY_METHOD_SAMPLE_EIGV: UncertaintyMethod.SAMPLE_EIGV,
}
METHODS_PB = {v: k for k, v in METHODS.items()}
STRATEGIES = {
    pb.SELECTION_STRATEGY_TOP_K: Strategy.TOP_K,
    pb.SELECTION_STRATEGY_DIVERSE: Strategy.DIVERSE,
    pb.SELECTION_STRATEGY_HYBRID: Strategy.HYBRID,
}
FORMATS = {
    pb.DATASET_FORMAT_SFT: DatasetFormat.SFT,
    pb.DATASET_FORMAT_DPO: DatasetFormat.DPO,
    pb.DATASET_FORMAT_KTO: DatasetFormat.KTO,
}


def _enum(table: dict, value: int, what: str) -> str | None:
    """None for UNSPECIFIED (the default); numbers this build lacks are passed on by name
    so that the domain layer rejects them with its own reason."""
    if value == 0:
        return None
    return table.get(value, f"{what}#{value}")


def candidate_in(c: pb.Candidate) -> CandidateIn:
    return CandidateIn(
        output=c.output,
        token_logprobs=c.token_logprobs,
        token_entropies=c.token_entropies,
        prompt=c.prompt,
        id=c.id,
        adapter=c.adapter.name,
        version=c.adapter.version,
        experiment=c.experiment,
        variant=c.variant,
        unit_id=c.unit_id,
        token_margins=c.token_margins,
        embedding=c.embedding,
        token_texts=c.token_texts,
    )


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def item_proto(item: Item) -> pb.QueueItem:
    scores = item.scores
    tokens = item.tokens
    method = item.get("method") or "entropy"
    return pb.QueueItem(
        id=item.id,
        prompt=item.get("prompt"),
        output=item.get("output"),
        adapter=common_pb2.AdapterRef(
            name=item.get("adapter"), version=int(item.get("version", "0") or 0)
        ),
        experiment=item.get("experiment"),
        variant=item.get("variant"),
        scores=pb.Scores(**scores),
        priority=scores.get(method, 0.0),
        create_time=_timestamp(float(item.get("created", "0") or 0)),
        reviews=int(item.get("reviews", "0") or 0),
        reviews_required=int(item.get("required", "1") or 1),
        token_entropies=tokens["entropies"],
        token_texts=tokens["texts"],
    )


def _feedback(request: pb.SubmitFeedbackRequest) -> Feedback:
    kind = request.WhichOneof("kind") or ""
    fb = Feedback(kind=kind, comment=request.comment)
    if kind == "rating":
        fb.rating = request.rating
    elif kind == "thumbs":
        if request.thumbs not in (pb.THUMBS_UP, pb.THUMBS_DOWN):
            fb.kind = "thumbs?"  # rejected by the domain layer as a missing kind
        fb.thumbs_up = request.thumbs == pb.THUMBS_UP
    elif kind == "pairwise":
        fb.other_item_id = request.pairwise.other_item_id
        fb.preferred_item_id = request.pairwise.preferred_item_id
    elif kind == "corrected_text":
        fb.corrected_text = request.corrected_text
    return fb


class ActiveLearningServicer(pb_grpc.ActiveLearningServiceServicer):
    def __init__(self, core: ActiveLearningCore) -> None:
        self.core = core

    async def SubmitCandidates(self, request: pb.SubmitCandidatesRequest, context):
        result = await self.core.submit(
            request.tenant, [candidate_in(c) for c in request.candidates]
        )
        return pb.SubmitCandidatesResponse(
            accepted=result.accepted,
            duplicates=result.duplicates,
            rejected=[
                pb.RejectedCandidate(index=i, reason=r, message=m) for i, r, m in result.rejected
            ],
            ids=result.ids,
        )

    async def SelectUncertain(self, request: pb.SelectUncertainRequest, context):
        result = await self.core.select(
            request.tenant,
            _enum(METHODS, request.method, "method"),
            _enum(STRATEGIES, request.strategy, "strategy"),
            request.batch_size,
            adapter=request.adapter,
            dry_run=request.dry_run,
        )
        return pb.SelectUncertainResponse(
            items=[item_proto(i) for i in result.items],
            method=METHODS_PB[result.method],
            pool_size=result.pool_size,
            near_duplicates=result.near_duplicates,
        )

    async def NextForFeedback(self, request: pb.NextForFeedbackRequest, context):
        lease, alternative = await self.core.next_item(request.tenant, request.reviewer)
        if lease is None:
            return pb.NextForFeedbackResponse()
        reply = pb.NextForFeedbackResponse(
            item=item_proto(lease.item),
            lease_id=lease.token,
            lease_expire_time=_timestamp(lease.expires),
        )
        if alternative is not None:
            reply.alternative.CopyFrom(item_proto(alternative))
        return reply

    async def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context):
        answer = await self.core.submit_feedback(
            request.tenant, request.item_id, request.reviewer, request.lease_id, _feedback(request)
        )
        return pb.SubmitFeedbackResponse(
            feedback_id=answer.feedback_id, reviews=answer.reviews, closed=answer.closed
        )

    async def ExportDataset(self, request: pb.ExportDatasetRequest, context):
        start = request.start_time.ToNanoseconds() / 1e9 if request.HasField("start_time") else None
        end = request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else None
        result = await self.core.export(
            request.tenant,
            _enum(FORMATS, request.format, "format") or "",
            adapter=request.adapter,
            start=start,
            end=end,
        )
        return pb.ExportDatasetResponse(
            jsonl=result.jsonl,
            rows=result.rows,
            feedback_records=result.records,
            truncated=result.truncated,
        )

    async def QueueStats(self, request: pb.QueueStatsRequest, context):
        stats = await self.core.stats(request.tenant)
        return pb.QueueStatsResponse(**stats)
