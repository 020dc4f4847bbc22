"""Zero-code training REST routes, scoped to the caller's tenant: jobs (with an SSE stream
of their progress), candidates (experiment, promote, discard) and federation of the
tenant's own adapters; /admin/training/federations federates any tenants' adapters into a
shared one.

Bodies use the proto JSON form of loraplex.training.v1 messages (snake_case accepted, and
"sft"/"dpo", "fedavg"/"stack"/"svd" for the enums); the tenant always comes from the API key.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Body, Depends
from fastapi.responses import StreamingResponse

from gateway.deps import GatewayDep, TenantDep, require_admin
from gateway.errors import rpc_error_response
from gateway.experiments_routes import parse_proto
from gateway.fields import PageSize
from gateway.protojson import proto_to_json
from loraplex.common.v1 import common_pb2
from loraplex.training.v1 import training_service_pb2 as tpb
from services.common.errors import InvalidArgument

router = APIRouter(prefix="/training", tags=["training"])
admin_router = APIRouter(
    prefix="/admin/training", tags=["admin"], dependencies=[Depends(require_admin)]
)

JsonObject = Annotated[dict[str, Any], Body()]
_SHORT = {
    "method": {"sft": "TRAINING_METHOD_SFT", "dpo": "TRAINING_METHOD_DPO"},
    "federation": {
        "fedavg": "FEDERATION_METHOD_FEDAVG",
        "stack": "FEDERATION_METHOD_STACK",
        "svd": "FEDERATION_METHOD_SVD",
    },
}


def _short(body: dict[str, Any], table: str) -> dict[str, Any]:
    value = body.get("method")
    if isinstance(value, str) and value.lower() in _SHORT[table]:
        return {**body, "method": _SHORT[table][value.lower()]}
    return body


def _candidate(value: str) -> common_pb2.AdapterRef:
    """<adapter>@<version> (the name is checked by the services)."""
    name, sep, version = value.rpartition("@")
    if not sep or not name or not version.isdigit() or int(version) < 1:
        raise InvalidArgument(
            f"name a candidate as <adapter>@<version>, not {value!r}", reason="BAD_CANDIDATE"
        )
    return common_pb2.AdapterRef(name=name, version=int(version))


@router.post("/jobs", status_code=201)
async def create_job(body: JsonObject, tenant: TenantDep, gateway: GatewayDep):
    """Body: CreateJobRequest's JSON without tenant, e.g. {"adapter": "support", "method":
    "sft", "data": {"feedback": {}}, "params": {"max_steps": 50}, "init_adapter": {"name":
    "support"}} or with "data": {"upload": {"jsonl": "..."}}."""
    request = parse_proto(_short(body, "method"), tpb.CreateJobRequest(), "training job")
    request.tenant = tenant
    reply = await gateway.require_training().CreateJob(request, timeout=gateway.timeout)
    return proto_to_json(reply.job)


@router.get("/jobs")
async def list_jobs(
    tenant: TenantDep,
    gateway: GatewayDep,
    page_size: PageSize = 0,
    page_token: str = "",
) -> dict[str, Any]:
    request = tpb.ListJobsRequest(tenant=tenant, page_size=page_size, page_token=page_token)
    reply = await gateway.require_training().ListJobs(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    request = tpb.GetJobRequest(tenant=tenant, job_id=job_id)
    reply = await gateway.require_training().GetJob(request, timeout=gateway.timeout)
    return proto_to_json(reply.job)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, tenant: TenantDep, gateway: GatewayDep) -> StreamingResponse:
    """Server-sent events: one `job` event with the job's JSON now and at every change,
    until it has finished. An unknown job is a 404 before the stream starts."""
    stub = gateway.require_training()
    await stub.GetJob(tpb.GetJobRequest(tenant=tenant, job_id=job_id), timeout=gateway.timeout)

    async def events() -> AsyncIterator[bytes]:
        stream = stub.WatchJob(tpb.WatchJobRequest(tenant=tenant, job_id=job_id))
        try:
            async for reply in stream:
                yield f"event: job\ndata: {json.dumps(proto_to_json(reply.job))}\n\n".encode()
        except grpc.aio.AioRpcError as err:  # after the 200: the error goes out as an event
            yield b"event: error\ndata: " + bytes(rpc_error_response(err).body) + b"\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    request = tpb.CancelJobRequest(tenant=tenant, job_id=job_id)
    reply = await gateway.require_training().CancelJob(request, timeout=gateway.timeout)
    return proto_to_json(reply.job)


@router.get("/candidates")
async def list_candidates(
    tenant: TenantDep,
    gateway: GatewayDep,
    page_size: PageSize = 0,
    page_token: str = "",
) -> dict[str, Any]:
    request = tpb.ListCandidatesRequest(tenant=tenant, page_size=page_size, page_token=page_token)
    reply = await gateway.require_training().ListCandidates(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.post("/candidates/{candidate}/experiment", status_code=201)
async def start_experiment(
    candidate: str,
    tenant: TenantDep,
    gateway: GatewayDep,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> dict[str, Any]:
    """`candidate` is <adapter>@<version>. Body (optional): {"candidate_traffic": 0.5,
    "experiment_key": "...", "metric": "rating", "auto_promote": false}."""
    request = parse_proto(body or {}, tpb.StartCandidateExperimentRequest(), "experiment")
    request.tenant = tenant
    request.candidate.CopyFrom(_candidate(candidate))
    reply = await gateway.require_training().StartCandidateExperiment(
        request, timeout=gateway.timeout
    )
    return proto_to_json(reply.candidate)


@router.post("/candidates/{candidate}/promote")
async def promote(candidate: str, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    request = tpb.PromoteCandidateRequest(tenant=tenant, candidate=_candidate(candidate))
    reply = await gateway.require_training().PromoteCandidate(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.post("/candidates/{candidate}/discard")
async def discard(candidate: str, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    request = tpb.DiscardCandidateRequest(tenant=tenant, candidate=_candidate(candidate))
    reply = await gateway.require_training().DiscardCandidate(request, timeout=gateway.timeout)
    return proto_to_json(reply.candidate)


@router.post("/federations", status_code=201)
async def federate(body: JsonObject, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    """Body: {"participants": [{"adapter": {"name": "site-a"}, "num_samples": 300}, ...],
    "method": "stack", "rank": 0, "output_name": "merged"}: the tenant's own adapters; the
    result is registered as the tenant's candidate."""
    request = parse_proto(_short(body, "federation"), tpb.FederateRequest(), "federation")
    request.tenant = tenant
    reply = await gateway.require_training().Federate(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@admin_router.post("/federations", status_code=201)
async def federate_tenants(body: JsonObject, gateway: GatewayDep) -> dict[str, Any]:
    """Admin: participants name their tenants (opt-in tenants' adapters); the result is
    registered as a shared platform adapter."""
    request = parse_proto(_short(body, "federation"), tpb.FederateRequest(), "federation")
    request.tenant = ""
    reply = await gateway.require_training().Federate(request, timeout=gateway.timeout)
    return proto_to_json(reply)
