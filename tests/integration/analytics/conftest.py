"""A real analytics gRPC server on a free port, on the session's real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from loraplex.analytics.v1 import analytics_service_pb2_grpc as pb_grpc
from services.analytics.app import create_server
from services.analytics.settings import AnalyticsSettings
from services.common.redis import connect


@pytest.fixture(scope="session")
async def analytics_server(redis_url: str) -> AsyncIterator:
    settings = AnalyticsSettings(
        port=0, redis_url=redis_url, shutdown_grace_seconds=1, max_batch_events=2_000
    )
    redis = connect(redis_url)
    server, core = create_server(settings, redis)
    await server.start()
    await core.ping()
    await server.set_ready()
    yield server
    await server.stop()
    await redis.aclose()


@pytest.fixture(scope="session")
async def analytics_stub(analytics_server) -> AsyncIterator[pb_grpc.AnalyticsServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{analytics_server.port}") as channel:
        yield pb_grpc.AnalyticsServiceStub(channel)
