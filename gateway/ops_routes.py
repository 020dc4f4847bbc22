"""Probes and metrics: /healthz (the process answers), /readyz (its dependencies answer),
/metrics (Prometheus, with the admin key or a metrics-scope key: its labels name tenants and
adapters). The probes need no key: they reveal nothing but up or down. /whoami tells a key
its own scope and tenant."""

from __future__ import annotations

import asyncio
import logging

import prometheus_client
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from gateway.deps import Credentials, Gateway, GatewayDep, authenticate, require_metrics_scope
from gateway.keys import Scope

log = logging.getLogger(__name__)
router = APIRouter(tags=["ops"])

OK = "ok"


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": OK}


async def _check_redis(gateway: Gateway) -> str:
    try:
        await asyncio.wait_for(gateway.redis.ping(), gateway.settings.health_timeout_seconds)
    except Exception as err:  # any failure means "not ready"; the reason goes to the log
        log.warning("redis is not ready", extra={"error": repr(err)})
        return "unreachable"
    return OK


async def _check_inference(gateway: Gateway) -> str:
    return await gateway.inference.health()  # "ok" while any replica is serving


@router.get("/readyz")
async def readyz(gateway: GatewayDep) -> JSONResponse:
    redis, inference = await asyncio.gather(_check_redis(gateway), _check_inference(gateway))
    checks = {"redis": redis, "inference": inference}
    ready = all(v == OK for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", dependencies=[Depends(require_metrics_scope)])
async def metrics() -> Response:
    return Response(
        prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )


@router.get("/whoami")
async def whoami(request: Request, gateway: GatewayDep, credentials: Credentials) -> dict[str, str]:
    """Who the presented key is: its scope ("admin" for the admin key) and tenant (empty for
    the admin and metrics keys). The console signs in with it."""
    if credentials is not None and gateway.is_admin_key(credentials.credentials):
        return {"scope": "admin", "tenant": ""}
    if credentials is not None and gateway.is_metrics_key(credentials.credentials):
        return {"scope": Scope.METRICS.value, "tenant": ""}  # the deployment's static key
    caller = await authenticate(request, gateway, credentials, set(Scope))
    return {
        "scope": caller.scope.value,
        "tenant": "" if caller.scope is Scope.METRICS else caller.tenant,
    }
