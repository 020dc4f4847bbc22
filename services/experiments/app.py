"""Builds the experiments gRPC server: the domain store behind its servicer."""

from __future__ import annotations

import redis.asyncio as aioredis

from loraplex.experiments.v1 import experiments_service_pb2_grpc as pb_grpc
from services.common.server import Server, ServiceSpec
from services.experiments.analytics_source import AnalyticsSource
from services.experiments.core import ExperimentStore
from services.experiments.servicer import SERVICE_NAME, ExperimentsServicer
from services.experiments.settings import ExperimentsSettings


def create_server(
    settings: ExperimentsSettings, redis: aioredis.Redis
) -> tuple[Server, ExperimentStore]:
    """Not started: `await server.start()`, then (once Redis answers) `server.set_ready()`."""
    store = ExperimentStore(redis, settings.definition_cache_seconds)
    analytics = None
    if settings.analytics_addr:
        analytics = AnalyticsSource(
            settings.analytics_addr,
            settings.analytics_timeout_seconds,
            settings.analytics_max_window_seconds,
            settings.base_model_name,
        )
    servicer = ExperimentsServicer(store, settings, analytics)
    spec = ServiceSpec(SERVICE_NAME, servicer, pb_grpc.add_ExperimentsServiceServicer_to_server)
    return Server(settings, [spec]), store
