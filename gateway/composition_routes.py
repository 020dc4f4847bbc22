"""Hot-swap and adapter-cache statistics for the caller's tenant (the product spec's
/composition/... endpoints).

A tenant swaps and rolls back only its own adapters: naming another tenant's adapter or a
platform adapter answers 404, exactly like a name nobody has. Statistics are the inference
service's CacheStats in proto JSON (new fields appear as they are added), with every listed
adapter that belongs to another tenant left out.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field

from gateway.deps import GatewayDep, TenantDep
from gateway.fields import UINT32_MAX
from gateway.openai_routes import list_visible_adapters
from gateway.protojson import proto_to_json
from loraplex.inference.v1 import inference_service_pb2 as pb

router = APIRouter(prefix="/composition", tags=["composition"])


class SwapBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1, description="One of the caller's adapter names")
    version: int = Field(ge=1, le=UINT32_MAX, description="The registered version to serve")
    expected_sha256: str = Field(
        "", description="Refuse the swap unless the version's weights have this sha256"
    )


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1)


@router.post("/swap")
async def swap_adapter(body: SwapBody, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    """Serve another registered version from now on; running requests finish on theirs."""
    request = pb.SwapAdapterRequest(
        tenant=tenant,
        name=body.adapter,
        version=body.version,
        expected_sha256=body.expected_sha256,
    )
    return proto_to_json(await gateway.inference.SwapAdapter(request, timeout=gateway.timeout))


@router.post("/rollback")
async def rollback_adapter(
    body: RollbackBody, tenant: TenantDep, gateway: GatewayDep
) -> dict[str, Any]:
    """Serve again the version that served before the current one."""
    request = pb.RollbackAdapterRequest(tenant=tenant, name=body.adapter)
    reply = await gateway.inference.RollbackAdapter(request, timeout=gateway.timeout)
    return proto_to_json(reply)


@router.get("/adapters")
async def list_adapters(tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    """The caller's adapters at their serving versions, then the platform's shared ones."""
    adapters = [proto_to_json(a) async for a in list_visible_adapters(gateway, tenant)]
    return {"adapters": adapters}


@router.get("/stats")
async def cache_stats(tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    reply = await gateway.inference.CacheStats(pb.CacheStatsRequest(), timeout=gateway.timeout)
    only_visible_to(reply, tenant)
    return proto_to_json(reply)


def only_visible_to(message: Message, tenant: str) -> None:
    """Drop, at any depth, list entries that carry a `tenant` other than the caller's or ''
    (the platform's): another tenant's adapter names must not leak through statistics."""
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
            continue
        if not field.is_repeated:
            only_visible_to(value, tenant)
            continue
        has_tenant = "tenant" in field.message_type.fields_by_name
        kept = [item for item in value if not has_tenant or item.tenant in ("", tenant)]
        for item in kept:
            only_visible_to(item, tenant)
        if len(kept) != len(value):
            copies = [type(item)() for item in kept]
            for copy, item in zip(copies, kept, strict=True):
                copy.CopyFrom(item)
            del value[:]
            value.extend(copies)
