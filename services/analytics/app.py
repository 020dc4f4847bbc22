"""Builds the analytics gRPC server: the domain core behind its servicer."""

from __future__ import annotations

import redis.asyncio as aioredis

from loraplex.analytics.v1 import analytics_service_pb2_grpc as pb_grpc
from services.analytics.core import AnalyticsCore
from services.analytics.servicer import SERVICE_NAME, AnalyticsServicer
from services.analytics.settings import AnalyticsSettings
from services.common.server import Server, ServiceSpec


def create_server(
    settings: AnalyticsSettings, redis: aioredis.Redis
) -> tuple[Server, AnalyticsCore]:
    """Not started: `await server.start()`, then `await core.ping()` (Redis reachable),
    then `await server.set_ready()` flips health to SERVING."""
    core = AnalyticsCore(settings, redis)
    spec = ServiceSpec(
        SERVICE_NAME, AnalyticsServicer(core), pb_grpc.add_AnalyticsServiceServicer_to_server
    )
    return Server(settings, [spec]), core
