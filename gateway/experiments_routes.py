"""A/B testing REST routes (the product spec's /ab-testing/...), scoped to the caller's tenant.

Bodies use the proto JSON form of loraplex.experiments.v1 messages (snake_case field names
accepted); the tenant always comes from the API key, never from the body.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, Field

from gateway.deps import GatewayDep, TenantDep
from gateway.fields import PageSize
from gateway.protojson import proto_to_json
from loraplex.experiments.v1 import experiments_service_pb2 as xpb
from services.common.errors import InvalidArgument

router = APIRouter(prefix="/ab-testing", tags=["ab-testing"])

JsonObject = Annotated[dict[str, Any], Body()]


M = TypeVar("M", bound=Message)


def parse_proto(body: dict[str, Any], message: M, what: str) -> M:
    try:
        return json_format.ParseDict(body, message)
    except json_format.ParseError as err:
        raise InvalidArgument(f"invalid {what}: {err}", reason="BAD_BODY") from err


class AssignBody(BaseModel):
    experiment: str = Field(min_length=1)
    unit_id: str


@router.post("/experiments", status_code=201)
async def create_experiment(body: JsonObject, tenant: TenantDep, gateway: GatewayDep):
    experiment = parse_proto(body, xpb.Experiment(), "experiment")
    request = xpb.CreateExperimentRequest(tenant=tenant, experiment=experiment)
    reply = await gateway.require_experiments().CreateExperiment(request, timeout=gateway.timeout)
    return proto_to_json(reply.experiment)


@router.get("/experiments")
async def list_experiments(
    tenant: TenantDep,
    gateway: GatewayDep,
    page_size: PageSize = 0,
    page_token: str = "",
) -> dict[str, Any]:
    request = xpb.ListExperimentsRequest(tenant=tenant, page_size=page_size, page_token=page_token)
    reply = await gateway.require_experiments().ListExperiments(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.get("/experiments/{key}")
async def get_experiment(key: str, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    request = xpb.GetExperimentRequest(tenant=tenant, key=key)
    reply = await gateway.require_experiments().GetExperiment(request, timeout=gateway.timeout)
    return proto_to_json(reply.experiment)


@router.patch("/experiments/{key}")
async def update_experiment(
    key: str, body: JsonObject, tenant: TenantDep, gateway: GatewayDep
) -> dict[str, Any]:
    """Body: UpdateExperimentRequest's JSON without tenant/key, e.g.
    {"action": "EXPERIMENT_ACTION_START"} or
    {"update_mask": "variants", "experiment": {"variants": [...]}}."""
    request = parse_proto(body, xpb.UpdateExperimentRequest(), "update")
    request.tenant, request.key = tenant, key
    reply = await gateway.require_experiments().UpdateExperiment(request, timeout=gateway.timeout)
    return proto_to_json(reply.experiment)


@router.get("/experiments/{key}/results")
async def experiment_results(key: str, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    request = xpb.GetResultsRequest(tenant=tenant, key=key)
    reply = await gateway.require_experiments().GetResults(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.post("/assign")
async def assign(body: AssignBody, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    request = xpb.AssignRequest(tenant=tenant, experiment_key=body.experiment, unit_id=body.unit_id)
    reply = await gateway.require_experiments().Assign(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.post("/outcomes")
async def record_outcomes(body: JsonObject, tenant: TenantDep, gateway: GatewayDep):
    """Body: {"outcomes": [{"experiment_key", "unit_id", "metric", "value"}, ...]}."""
    request = parse_proto(body, xpb.RecordOutcomesRequest(), "outcomes")
    request.tenant = tenant
    reply = await gateway.require_experiments().RecordOutcomes(request, timeout=gateway.timeout)
    return proto_to_json(reply)
