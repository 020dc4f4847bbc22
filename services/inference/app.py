"""Builds the inference gRPC server: the domain core behind its servicer."""

from __future__ import annotations

import redis.asyncio as aioredis

from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.server import Server, ServiceSpec
from services.inference.core import InferenceCore
from services.inference.metrics import COLLECTOR
from services.inference.servicer import SERVICE_NAME, InferenceServicer
from services.inference.settings import InferenceSettings


def create_server(
    settings: InferenceSettings, redis: aioredis.Redis
) -> tuple[Server, InferenceCore]:
    """Not started: `await server.start()`, then `await core.start()` (loads the model),
    then `await server.set_ready()` flips health to SERVING."""
    core = InferenceCore(settings, redis)
    COLLECTOR.track(core)  # /metrics reads its cache and batch state
    spec = ServiceSpec(
        SERVICE_NAME, InferenceServicer(core), pb_grpc.add_InferenceServiceServicer_to_server
    )
    return Server(settings, [spec]), core
