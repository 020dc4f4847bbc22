"""What the routes share (clients of Redis and the services), and authentication.

create_app() puts one Gateway on app.state; routes receive it and the caller's identity
through FastAPI dependencies, so nothing here is a module-level global.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

import grpc
import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from grpc_health.v1 import health_pb2_grpc

from gateway.active_learning_exporter import CandidateExporter
from gateway.adapter_metrics import AdapterSeries
from gateway.keys import TenantKeyStore
from gateway.settings import GatewaySettings
from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as alpb_grpc
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.experiments.v1 import experiments_service_pb2_grpc as xpb_grpc
from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from loraplex.training.v1 import training_service_pb2_grpc as tpb_grpc
from services.common.analytics_exporter import AnalyticsExporter
from services.common.errors import Unauthenticated, Unavailable
from services.experiments.client import ExperimentsClient


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        redis: aioredis.Redis,
        inference_channel: grpc.aio.Channel,
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
        self.exporter = AnalyticsExporter(analytics_channel) if analytics_channel else None
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
        self.inference = pb_grpc.InferenceServiceStub(inference_channel)
        self.inference_health = health_pb2_grpc.HealthStub(inference_channel)
        # Deadline for every gRPC call made for a request.
        self.timeout = settings.request_timeout_seconds
        admin = settings.admin_key
        self._admin_digest = _digest(admin.get_secret_value()) if admin else None
        self._model_info: pb.GetModelInfoResponse | None = None

    async def model_info(self) -> pb.GetModelInfoResponse:
        """The base model's description; it cannot change while inference runs, so the first
        successful answer is kept."""
        if self._model_info is None:
            self._model_info = await self.inference.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout
            )
        return self._model_info

    def require_analytics(self) -> apb_grpc.AnalyticsServiceStub:
        if self.analytics is None:
            raise Unavailable(
                "analytics is not configured on this gateway (ANALYTICS_ADDR)",
                reason="ANALYTICS_DISABLED",
            )
        return self.analytics

    def require_experiments(self) -> xpb_grpc.ExperimentsServiceStub:
        if self.experiments is None:
            raise Unavailable(
                "experiments are not configured on this gateway (EXPERIMENTS_ADDR)",
                reason="EXPERIMENTS_DISABLED",
            )
        return self.experiments

    def require_assigner(self) -> ExperimentsClient:
        self.require_experiments()  # the same 503 as the other experiment routes
        return self.assigner  # type: ignore[return-value]  # set whenever experiments is

    def require_activelearning(self) -> alpb_grpc.ActiveLearningServiceStub:
        if self.activelearning is None:
            raise Unavailable(
                "active learning is not configured on this gateway (ACTIVELEARNING_ADDR)",
                reason="ACTIVELEARNING_DISABLED",
            )
        return self.activelearning

    def require_training(self) -> tpb_grpc.TrainingServiceStub:
        if self.training is None:
            raise Unavailable(
                "training is not configured on this gateway (TRAINING_ADDR)",
                reason="TRAINING_DISABLED",
            )
        return self.training

    def is_admin_key(self, presented: str) -> bool:
        # Comparing fixed-length digests in constant time leaks neither content nor length.
        return self._admin_digest is not None and hmac.compare_digest(
            _digest(presented), self._admin_digest
        )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
# auto_error=False: a missing header must give our 401 body, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def authenticate_tenant(gateway: GatewayDep, credentials: Credentials) -> str:
    """`Authorization: Bearer <api key>` -> the tenant that owns the key."""
    if credentials is None:
        raise Unauthenticated(
            "missing API key: send the header 'Authorization: Bearer <key>'",
            reason="API_KEY_MISSING",
        )
    tenant = await gateway.keys.resolve(credentials.credentials)
    if tenant is None:
        raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
    return tenant


async def require_admin(gateway: GatewayDep, credentials: Credentials) -> None:
    """Admin routes accept only the admin key; anything else (tenant keys too) is a 401."""
    if gateway.settings.admin_key is None:
        raise Unauthenticated(
            "the admin API is disabled: no admin key is configured (LORAPLEX_ADMIN_KEY)",
            reason="ADMIN_DISABLED",
        )
    if credentials is None or not gateway.is_admin_key(credentials.credentials):
        raise Unauthenticated("missing or invalid admin key", reason="ADMIN_KEY_INVALID")


TenantDep = Annotated[str, Depends(authenticate_tenant)]
