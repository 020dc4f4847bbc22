"""POST /active-learning/select: pick the caller's outputs most worth a human's feedback."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway.deps import GatewayDep, TenantDep
from gateway.fields import Identifier, Int32
from gateway.protojson import proto_to_json
from loraplex.activelearning.v1 import activelearning_service_pb2 as alpb
from services.common.errors import InvalidArgument

router = APIRouter(prefix="/active-learning", tags=["active-learning"])

# Method names as the contract spells them: UNCERTAINTY_METHOD_SAMPLE_EIGV -> sample_eigv.
METHODS = {
    name.removeprefix("UNCERTAINTY_METHOD_").lower(): number
    for name, number in alpb.UncertaintyMethod.items()
    if number != alpb.UNCERTAINTY_METHOD_UNSPECIFIED
}
METHOD_NAMES = {v: k for k, v in METHODS.items()}
STRATEGIES = {
    "top_k": alpb.SELECTION_STRATEGY_TOP_K,
    "diverse": alpb.SELECTION_STRATEGY_DIVERSE,
    "hybrid": alpb.SELECTION_STRATEGY_HYBRID,
}


def choose(table: dict[str, int], value: str | None, what: str) -> int:
    if value is None:
        return 0  # the service's default
    if value not in table:
        raise InvalidArgument(
            f"unknown {what} {value!r}; use one of {', '.join(table)}",
            reason=f"UNKNOWN_{what.upper()}",
        )
    return table[value]


class SelectBody(BaseModel):
    method: str | None = Field(default=None, description=", ".join(METHODS))
    strategy: str | None = Field(default=None, description=", ".join(STRATEGIES))
    batch_size: Int32 = 10  # fits the proto; the service judges the range
    adapter: Identifier = ""
    dry_run: bool = False


@router.post("/select")
async def select(body: SelectBody, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    """The batch_size open outputs most worth feedback; unless dry_run they go to the front
    of the feedback queue (GET /feedback/next) in this order."""
    request = alpb.SelectUncertainRequest(
        tenant=tenant,
        method=choose(METHODS, body.method, "method"),
        strategy=choose(STRATEGIES, body.strategy, "strategy"),
        batch_size=body.batch_size,
        adapter=body.adapter,
        dry_run=body.dry_run,
    )
    stub = gateway.require_activelearning()
    reply = await stub.SelectUncertain(request, timeout=gateway.timeout)
    return {
        "method": METHOD_NAMES.get(reply.method, ""),
        "pool_size": reply.pool_size,
        "near_duplicates": reply.near_duplicates,
        "items": [proto_to_json(i) for i in reply.items],
    }
