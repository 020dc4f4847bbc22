"""Admin routes: tenants, their API keys, adapter uploads, cache statistics.

Every route needs the admin key (router-level dependency).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from pydantic import BaseModel, Field

from gateway.deps import Gateway, GatewayDep, require_admin
from gateway.fields import UINT32_MAX
from gateway.keys import Scope, parse_scope
from gateway.limits import TenantLimits
from gateway.protojson import proto_to_json
from gateway.replicas import merge_cache_stats
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.keys import PLATFORM

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class NewTenant(BaseModel):
    tenant: str


@dataclass(frozen=True)
class AdapterUpload:
    name: str
    version: int
    sha256: str
    files: list[pb.AdapterFile]


def _base_name(filename: str | None) -> str:
    # Clients may send a path ("adapter/adapter_config.json", or with backslashes from
    # Windows); the adapter store wants bare file names.
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    if not name:
        raise InvalidArgument("every uploaded file needs a file name", reason="FILE_NAME_MISSING")
    return name


async def read_adapter_upload(
    name: Annotated[str, Form(min_length=1)],
    files: Annotated[list[UploadFile], File(description="The PEFT adapter directory's files")],
    version: Annotated[int, Form(ge=0, le=UINT32_MAX, description="0: the next one")] = 0,
    sha256: Annotated[str, Form(description="Expected sha256 of the weights")] = "",
) -> AdapterUpload:
    contents: dict[str, bytes] = {}
    for upload in files:
        file_name = _base_name(upload.filename)
        if file_name in contents:
            raise InvalidArgument(
                f"file {file_name!r} was uploaded twice", reason="DUPLICATE_FILE", file=file_name
            )
        contents[file_name] = await upload.read()
    adapter_files = [pb.AdapterFile(name=n, content=c) for n, c in contents.items()]
    return AdapterUpload(name=name, version=version, sha256=sha256, files=adapter_files)


UploadDep = Annotated[AdapterUpload, Depends(read_adapter_upload)]


async def _register(
    gateway: Gateway, upload: AdapterUpload, *, tenant: str, shared: bool
) -> dict[str, Any]:
    request = pb.RegisterAdapterRequest(
        tenant=tenant,
        name=upload.name,
        version=upload.version,
        files=upload.files,
        expected_sha256=upload.sha256,
        shared=shared,
    )
    reply = await gateway.inference.RegisterAdapter(request, timeout=gateway.timeout)
    return proto_to_json(reply.adapter)


@router.post("/tenants", status_code=201)
async def create_tenant(body: NewTenant, gateway: GatewayDep) -> dict[str, Any]:
    return asdict(await gateway.keys.create_tenant(body.tenant))


@router.get("/tenants")
async def list_tenants(gateway: GatewayDep) -> dict[str, Any]:
    return {"tenants": [asdict(t) for t in await gateway.keys.list_tenants()]}


class NewKey(BaseModel):
    scope: str = Field(default="tenant", description="tenant, or reviewer (review queue only)")


@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(
    tenant: str, gateway: GatewayDep, body: NewKey | None = None
) -> dict[str, Any]:
    """A new API key for the tenant. The response is the only place the key is shown."""
    scope = parse_scope((body or NewKey()).scope)
    if scope is Scope.METRICS:
        raise InvalidArgument(
            "a metrics key belongs to no tenant: POST /admin/metrics-keys",
            reason="SCOPE_NOT_FOR_TENANT",
        )
    return asdict(await gateway.keys.create_key(tenant, scope))


@router.get("/audit")
async def audit_log(
    gateway: GatewayDep,
    tenant: Annotated[str, Query(max_length=63, description="only this tenant's")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Who changed what, newest first: uploads, keys, limits, swaps, experiments."""
    return {"entries": [asdict(e) for e in await gateway.audit.latest(limit, tenant)]}


@router.get("/tenants/{tenant}/limits")
async def get_limits(tenant: str, gateway: GatewayDep) -> dict[str, Any]:
    """The tenant's limits in force (the gateway's defaults where none were set)."""
    await gateway.keys.require_tenant(tenant)
    return asdict(await gateway.limits.get(tenant))


@router.put("/tenants/{tenant}/limits")
async def set_limits(tenant: str, limits: TenantLimits, gateway: GatewayDep) -> dict[str, Any]:
    """Replace the tenant's limits (0: unlimited); every gateway applies them at once."""
    await gateway.keys.require_tenant(tenant)
    await gateway.limits.set(tenant, limits)
    return asdict(limits)


@router.post("/metrics-keys", status_code=201)
async def create_metrics_key(gateway: GatewayDep) -> dict[str, Any]:
    """A key that may read /metrics and nothing else (for Prometheus)."""
    return asdict(await gateway.keys.create_key(PLATFORM, Scope.METRICS))


@router.get("/tenants/{tenant}/keys")
async def list_keys(tenant: str, gateway: GatewayDep) -> dict[str, Any]:
    return {"tenant": tenant, "key_ids": await gateway.keys.list_key_ids(tenant)}


@router.delete("/tenants/{tenant}/keys/{key_id}", status_code=204)
async def revoke_key(tenant: str, key_id: str, gateway: GatewayDep) -> Response:
    await gateway.keys.revoke_key(tenant, key_id)
    return Response(status_code=204)


@router.post("/tenants/{tenant}/adapters", status_code=201)
async def register_adapter(tenant: str, upload: UploadDep, gateway: GatewayDep) -> dict[str, Any]:
    # The inference service does not know tenants; the gateway's registry does.
    await gateway.keys.require_tenant(tenant)
    return await _register(gateway, upload, tenant=tenant, shared=False)


@router.post("/shared-adapters", status_code=201)
async def register_shared_adapter(upload: UploadDep, gateway: GatewayDep) -> dict[str, Any]:
    return await _register(gateway, upload, tenant="", shared=True)


@router.get("/cache")
async def cache_stats(gateway: GatewayDep) -> dict[str, Any]:
    """Every inference replica's cache as one, and each replica's under `replicas`."""
    each = await gateway.inference.each(
        "CacheStats", pb.CacheStatsRequest(), timeout=gateway.timeout
    )
    merged = proto_to_json(merge_cache_stats([reply for _, reply in each]))
    replicas = [{"address": address} | proto_to_json(reply) for address, reply in each]
    return merged | {"replicas": replicas}
