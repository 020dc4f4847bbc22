"""What the routes share (clients of Redis and the services), and authentication.

create_app() puts one Gateway on app.state; routes receive it and the caller's identity
through FastAPI dependencies, so nothing here is a module-level global.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import replace
from typing import Annotated, TypeVar

import grpc
import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.active_learning_exporter import CandidateExporter
from gateway.adapter_metrics import AdapterSeries
from gateway.audit import AuditLog
from gateway.keys import Caller, Scope, TenantKeyStore
from gateway.limits import RateLimiter
from gateway.replicas import InferenceReplicas
from gateway.settings import GatewaySettings
from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as alpb_grpc
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.experiments.v1 import experiments_service_pb2_grpc as xpb_grpc
from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.training.v1 import training_service_pb2_grpc as tpb_grpc
from services.common.analytics_exporter import AnalyticsExporter, analytics_outbox
from services.common.batch_exporter import BatchExporter
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from services.experiments.client import ExperimentsClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# With the admin key, a tenant's routes act for the tenant this header names.
ACT_FOR_TENANT = "X-Loraplex-Tenant"
ADMIN_KEY_ID = "admin"  # the key id the admin's calls for a tenant are limited under


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        redis: aioredis.Redis,
        inference: InferenceReplicas,
        analytics_channel: grpc.aio.Channel | None = None,
        experiments_channel: grpc.aio.Channel | None = None,
        activelearning_channel: grpc.aio.Channel | None = None,
        training_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.settings = settings
        self.training = tpb_grpc.TrainingServiceStub(training_channel) if training_channel else None
        # Active learning: every completion becomes a candidate (off the request path).
        self.activelearning = (
            alpb_grpc.ActiveLearningServiceStub(activelearning_channel)
            if activelearning_channel
            else None
        )
        self.candidates = (
            CandidateExporter(activelearning_channel) if activelearning_channel else None
        )
        self.analytics = (
            apb_grpc.AnalyticsServiceStub(analytics_channel) if analytics_channel else None
        )
        # Usage events wait in a Redis outbox, so an analytics outage loses none of them.
        self.exporter = (
            AnalyticsExporter(
                analytics_channel,
                outbox=analytics_outbox(
                    redis, settings.instance, settings.analytics_outbox_max_events
                ),
            )
            if analytics_channel
            else None
        )
        self.adapter_series = AdapterSeries(settings.adapter_metrics_limit)
        self.experiments = (
            xpb_grpc.ExperimentsServiceStub(experiments_channel) if experiments_channel else None
        )
        # `experiment:<key>` completions are assigned here, without an RPC per request (the
        # experiments service's client library, on the same Redis). create_app's lifespan
        # starts it listening for definition changes.
        self.assigner = ExperimentsClient(redis) if experiments_channel else None
        self.redis = redis
        self.keys = TenantKeyStore(redis)
        self.audit = AuditLog(redis)
        self.limits = RateLimiter(redis, settings.tenant_limits)
        self._charges: set[asyncio.Task] = set()
        # Used like an InferenceServiceStub; routes each call to a replica (gateway/replicas.py).
        self.inference = inference
        # Deadline for every gRPC call made for a request.
        self.timeout = settings.request_timeout_seconds
        admin, scraper = settings.admin_key, settings.metrics_key
        self._admin_digest = _digest(admin.get_secret_value()) if admin else None
        self._metrics_digest = _digest(scraper.get_secret_value()) if scraper else None
        self._model_info: pb.GetModelInfoResponse | None = None

    @property
    def exporters(self) -> list[BatchExporter]:
        """The background senders to start with the app and flush when it stops."""
        return [e for e in (self.exporter, self.candidates) if e is not None]

    def charge_tokens(self, caller: Caller, tokens: int) -> None:
        """Take what a generation used from its tenant's token budget, off the request path
        (a failure only loses that charge: the budget is a limit, not a bill)."""

        async def charge() -> None:
            try:
                await self.limits.charge(caller.tenant, caller.key_id, tokens)
            except Exception as err:
                log.warning("token budget charge lost", extra={"error": repr(err)})

        task = asyncio.get_running_loop().create_task(charge())
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def model_info(self) -> pb.GetModelInfoResponse:
        """The base model's description; it cannot change while inference runs, so the first
        successful answer is kept."""
        if self._model_info is None:
            self._model_info = await self.inference.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout
            )
        return self._model_info

    def require_analytics(self) -> apb_grpc.AnalyticsServiceStub:
        return _configured(self.analytics, "ANALYTICS_ADDR", "ANALYTICS_DISABLED")

    def require_experiments(self) -> xpb_grpc.ExperimentsServiceStub:
        return _configured(self.experiments, "EXPERIMENTS_ADDR", "EXPERIMENTS_DISABLED")

    def require_assigner(self) -> ExperimentsClient:
        self.require_experiments()  # the same 503 as the other experiment routes
        return self.assigner  # type: ignore[return-value]  # set whenever experiments is

    def require_activelearning(self) -> alpb_grpc.ActiveLearningServiceStub:
        return _configured(self.activelearning, "ACTIVELEARNING_ADDR", "ACTIVELEARNING_DISABLED")

    def require_training(self) -> tpb_grpc.TrainingServiceStub:
        return _configured(self.training, "TRAINING_ADDR", "TRAINING_DISABLED")

    def is_admin_key(self, presented: str) -> bool:
        return _matches(presented, self._admin_digest)

    def is_metrics_key(self, presented: str) -> bool:
        """The admin key, or the deployment's static metrics key."""
        return self.is_admin_key(presented) or _matches(presented, self._metrics_digest)


def _configured(stub: T | None, env: str, reason: str) -> T:
    """The service's stub, or 503 when this gateway has no address for it (a deployment may
    leave the optional services out)."""
    if stub is None:
        raise Unavailable(
            f"this capability is not deployed behind this gateway ({env} is not set)", reason=reason
        )
    return stub


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _matches(presented: str, digest: bytes | None) -> bool:
    # Comparing fixed-length digests in constant time leaks neither content nor length.
    return digest is not None and hmac.compare_digest(_digest(presented), digest)


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
# auto_error=False: a missing header must give our 401 body, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def authenticate(
    request: Request, gateway: GatewayDep, credentials: Credentials, allowed: set[Scope]
) -> Caller:
    """`Authorization: Bearer <api key>` -> who the key is, if its scope is allowed here.
    Who called is kept on the request for the audit log."""
    if credentials is None:
        raise Unauthenticated(
            "missing API key: send the header 'Authorization: Bearer <key>'",
            reason="API_KEY_MISSING",
        )
    if Scope.TENANT in allowed and gateway.is_admin_key(credentials.credentials):
        return await _admin_for_tenant(request, gateway)
    caller = await gateway.keys.resolve(credentials.credentials)
    if caller is None:
        raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
    if caller.scope not in allowed:
        raise PermissionDenied(
            f"a {caller.scope} key cannot call this route", reason="KEY_SCOPE", scope=caller.scope
        )
    request.state.actor = f"{caller.scope}:{caller.key_id[:12]}"
    request.state.caller = caller
    if caller.scope is Scope.METRICS:
        return caller
    ceiling = await gateway.limits.admit(caller.tenant, caller.key_id)
    return replace(caller, max_tokens_per_request=ceiling)


async def _admin_for_tenant(request: Request, gateway: Gateway) -> Caller:
    """The admin key on a tenant's route acts for the tenant its ACT_FOR_TENANT header
    names (the console's tenant picker), with that tenant's limits; audited as the admin."""
    tenant = request.headers.get(ACT_FOR_TENANT, "")
    if not tenant:
        raise InvalidArgument(
            f"the admin key acts for a tenant: name it in the {ACT_FOR_TENANT} header",
            reason="TENANT_REQUIRED",
        )
    await gateway.keys.require_tenant(tenant)
    request.state.actor = "admin"
    caller = Caller(tenant, Scope.TENANT, ADMIN_KEY_ID)
    request.state.caller = caller
    ceiling = await gateway.limits.admit(tenant, ADMIN_KEY_ID)
    return replace(caller, max_tokens_per_request=ceiling)


async def authenticate_caller(
    request: Request, gateway: GatewayDep, credentials: Credentials
) -> Caller:
    """A key with the tenant scope: the tenant's whole API."""
    return await authenticate(request, gateway, credentials, {Scope.TENANT})


async def authenticate_tenant(caller: Annotated[Caller, Depends(authenticate_caller)]) -> str:
    return caller.tenant


async def authenticate_reviewer(
    request: Request, gateway: GatewayDep, credentials: Credentials
) -> str:
    """The tenant of a tenant or reviewer key: the review queue."""
    allowed = {Scope.TENANT, Scope.REVIEWER}
    return (await authenticate(request, gateway, credentials, allowed)).tenant


async def require_metrics_scope(
    request: Request, gateway: GatewayDep, credentials: Credentials
) -> None:
    """The Prometheus scrape: the admin key or a metrics key (label values name tenants)."""
    if credentials is not None and gateway.is_metrics_key(credentials.credentials):
        return
    await authenticate(request, gateway, credentials, {Scope.METRICS})


async def require_admin(request: Request, gateway: GatewayDep, credentials: Credentials) -> None:
    """Admin routes accept only the admin key; anything else (tenant keys too) is a 401."""
    if gateway.settings.admin_key is None:
        raise Unauthenticated(
            "the admin API is disabled: no admin key is configured (LORAPLEX_ADMIN_KEY)",
            reason="ADMIN_DISABLED",
        )
    if credentials is None or not gateway.is_admin_key(credentials.credentials):
        raise Unauthenticated("missing or invalid admin key", reason="ADMIN_KEY_INVALID")
    request.state.actor = "admin"


async def require_admin_for_tenant(
    request: Request, gateway: GatewayDep, credentials: Credentials
) -> str:
    """The admin key acting for the tenant X-Loraplex-Tenant names (vLLM's adapter routes,
    which sit among the tenants' /v1 routes). Any other valid key is a 403, none a 401."""
    if credentials is not None and gateway.is_admin_key(credentials.credentials):
        return (await _admin_for_tenant(request, gateway)).tenant
    await authenticate(request, gateway, credentials, set())  # raises: no scope is allowed
    raise AssertionError("authenticate() admits no key when no scope is allowed")


TenantDep = Annotated[str, Depends(authenticate_tenant)]
CallerDep = Annotated[Caller, Depends(authenticate_caller)]
ReviewerDep = Annotated[str, Depends(authenticate_reviewer)]
