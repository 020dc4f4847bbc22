"""gRPC servicer: translates protos to TrainingCore calls and back. No logic of its own."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.common.v1 import common_pb2
from loraplex.training.v1 import training_service_pb2 as pb
from loraplex.training.v1 import training_service_pb2_grpc as pb_grpc
from services.training.candidates import CandidateRecord
from services.training.core import DataSource, Participant, TrainingCore
from services.training.jobs import Job

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name

_METHODS = {pb.TRAINING_METHOD_SFT: "sft", pb.TRAINING_METHOD_DPO: "dpo"}
_METHODS_PB = {v: k for k, v in _METHODS.items()}
_STATES = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
_CANDIDATE_STATES = {
    "candidate": pb.CANDIDATE_STATE_CANDIDATE,
    "in_experiment": pb.CANDIDATE_STATE_IN_EXPERIMENT,
    "promoted": pb.CANDIDATE_STATE_PROMOTED,
    "discarded": pb.CANDIDATE_STATE_DISCARDED,
}
_FEDERATION = {
    pb.FEDERATION_METHOD_FEDAVG: "fedavg",
    pb.FEDERATION_METHOD_STACK: "stack",
    pb.FEDERATION_METHOD_SVD: "svd",
}


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _seconds(ts: Timestamp, present: bool) -> float | None:
    return ts.ToNanoseconds() / 1e9 if present else None


def params_given(params: pb.TrainingParams) -> dict[str, Any]:
    """Only the fields the caller set (the rest take the server's defaults)."""
    given: dict[str, Any] = {
        f.name: value for f, value in params.ListFields() if f.name != "target_modules"
    }
    if params.target_modules:
        given["target_modules"] = list(params.target_modules)
    return given


def params_proto(params: dict[str, Any]) -> pb.TrainingParams:
    known = {f.name for f in pb.TrainingParams.DESCRIPTOR.fields}
    return pb.TrainingParams(**{k: v for k, v in params.items() if k in known})


def _ref(adapter: dict[str, Any]) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(name=adapter.get("name", ""), version=adapter.get("version", 0))


def record_proto(record: dict[str, Any]) -> pb.TrainingRecord:
    if not record:
        return pb.TrainingRecord()
    return pb.TrainingRecord(
        data_fingerprint=record.get("data_fingerprint", ""),
        train_examples=record.get("train_examples", 0),
        heldout_examples=record.get("heldout_examples", 0),
        params=params_proto(record.get("params", {})),
        method=_METHODS_PB.get(record.get("method", ""), pb.TRAINING_METHOD_UNSPECIFIED),
        init_adapter=_ref(record.get("init_adapter") or {}),
        train_loss=record.get("train_loss", 0.0),
        eval_loss_before=record.get("eval_loss_before", 0.0),
        eval_loss=record.get("eval_loss", 0.0),
        steps=record.get("steps", 0),
        train_tokens=record.get("train_tokens", 0),
        tokens_per_second=record.get("tokens_per_second", 0.0),
        duration_seconds=record.get("job_seconds", record.get("duration_seconds", 0.0)),
        resumes=record.get("resumes", 0),
        base_model=record.get("base_model", ""),
        resumed_from_step=record.get("resumed_from_step", 0),
    )


def job_proto(job: Job) -> pb.Job:
    p = job.progress
    return pb.Job(
        id=job.id,
        tenant=job.tenant,
        adapter=job.adapter,
        method=_METHODS_PB[job.method],
        state=_STATES[job.state],
        params=params_proto(job.params),
        init_adapter=_ref(job.init_adapter),
        data_source=job.data_source,
        data_fingerprint=job.data_fingerprint,
        train_examples=job.train_examples,
        heldout_examples=job.heldout_examples,
        progress=pb.Progress(
            step=p.get("step", 0),
            total_steps=p.get("total_steps", 0),
            epoch=p.get("epoch", 0.0),
            loss=p.get("loss", 0.0),
            eval_loss=p.get("eval_loss"),
            tokens_per_second=p.get("tokens_per_second", 0.0),
            eta_seconds=p.get("eta_seconds", 0.0),
        ),
        candidate=common_pb2.AdapterRef(name=job.adapter, version=job.candidate_version)
        if job.candidate_version
        else None,
        record=record_proto(job.record),
        error_reason=job.error_reason,
        error_message=job.error_message,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        create_time=_timestamp(job.created),
        start_time=_timestamp(job.started),
        end_time=_timestamp(job.ended),
    )


def candidate_proto(c: CandidateRecord) -> pb.Candidate:
    return pb.Candidate(
        tenant=c.tenant,
        adapter=common_pb2.AdapterRef(name=c.name, version=c.version),
        state=_CANDIDATE_STATES[c.state],
        job_id=c.job_id,
        record=record_proto(c.record),
        experiment_key=c.experiment_key,
        baseline_version=c.baseline_version,
        auto_promote=c.auto_promote,
        create_time=_timestamp(c.created),
        update_time=_timestamp(c.updated),
    )


def data_source(request: pb.CreateJobRequest) -> DataSource:
    which = request.data.WhichOneof("source") or ""
    if which == "upload":
        return DataSource("upload", jsonl=request.data.upload.jsonl.encode())
    if which == "feedback":
        f = request.data.feedback
        return DataSource(
            "feedback",
            adapter=f.adapter,
            start=_seconds(f.start_time, f.HasField("start_time")),
            end=_seconds(f.end_time, f.HasField("end_time")),
        )
    return DataSource("")


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, core: TrainingCore) -> None:
        self.core = core

    async def CreateJob(self, request: pb.CreateJobRequest, context):
        job = await self.core.create_job(
            request.tenant,
            request.adapter,
            _METHODS.get(request.method, ""),
            data_source(request),
            params_given(request.params),
            init_name=request.init_adapter.name,
            init_version=request.init_adapter.version,
        )
        return pb.CreateJobResponse(job=job_proto(job))

    async def GetJob(self, request: pb.GetJobRequest, context):
        return pb.GetJobResponse(
            job=job_proto(await self.core.get_job(request.tenant, request.job_id))
        )

    async def ListJobs(self, request: pb.ListJobsRequest, context):
        jobs, token = await self.core.list_jobs(
            request.tenant, request.page_size, request.page_token
        )
        return pb.ListJobsResponse(jobs=[job_proto(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context):
        job = await self.core.cancel_job(request.tenant, request.job_id)
        return pb.CancelJobResponse(job=job_proto(job))

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        async for job in self.core.watch_job(request.tenant, request.job_id):
            yield pb.WatchJobResponse(job=job_proto(job))

    async def ListCandidates(self, request: pb.ListCandidatesRequest, context):
        found, token = await self.core.list_candidates(
            request.tenant, request.page_size, request.page_token
        )
        return pb.ListCandidatesResponse(
            candidates=[candidate_proto(c) for c in found], next_page_token=token
        )

    async def StartCandidateExperiment(self, request: pb.StartCandidateExperimentRequest, context):
        candidate = await self.core.start_experiment(
            request.tenant,
            request.candidate.name,
            request.candidate.version,
            traffic=request.candidate_traffic,
            key=request.experiment_key,
            metric=request.metric,
            auto_promote=request.auto_promote,
        )
        return pb.StartCandidateExperimentResponse(candidate=candidate_proto(candidate))

    async def PromoteCandidate(self, request: pb.PromoteCandidateRequest, context):
        candidate, previous = await self.core.promote(
            request.tenant, request.candidate.name, request.candidate.version
        )
        return pb.PromoteCandidateResponse(
            candidate=candidate_proto(candidate), previous_version=previous
        )

    async def DiscardCandidate(self, request: pb.DiscardCandidateRequest, context):
        candidate = await self.core.discard(
            request.tenant, request.candidate.name, request.candidate.version
        )
        return pb.DiscardCandidateResponse(candidate=candidate_proto(candidate))

    async def Federate(self, request: pb.FederateRequest, context):
        merged, registered = await self.core.federate(
            request.tenant,
            [
                Participant(p.tenant, p.adapter.name, p.adapter.version, p.num_samples)
                for p in request.participants
            ],
            _FEDERATION.get(request.method, f"#{request.method}" if request.method else "fedavg"),
            request.rank,
            request.output_name,
        )
        return pb.FederateResponse(
            adapter=registered.adapter,
            weights=merged.weights,
            relative_error=merged.relative_error,
            rank=merged.rank,
        )
