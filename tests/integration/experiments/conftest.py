"""A real experiments gRPC server (real Redis) on a free port, per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from loraplex.experiments.v1 import experiments_service_pb2_grpc as pb_grpc
from services.common.redis import connect
from services.common.server import Server
from services.experiments.app import create_server
from services.experiments.core import ExperimentStore
from services.experiments.settings import ExperimentsSettings


@pytest.fixture(scope="session")
async def exp_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def experiments_server(
    redis_url: str, exp_redis
) -> AsyncIterator[tuple[Server, ExperimentStore]]:
    settings = ExperimentsSettings(port=0, redis_url=redis_url, shutdown_grace_seconds=1)
    redis = connect(redis_url)
    server, store = create_server(settings, redis)
    await server.start()
    await server.set_ready()
    yield server, store
    await server.stop()
    store.close()
    await redis.aclose()


@pytest.fixture(scope="session")
async def exp_stub(experiments_server) -> AsyncIterator[pb_grpc.ExperimentsServiceStub]:
    server, _ = experiments_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield pb_grpc.ExperimentsServiceStub(chan)


@pytest.fixture(scope="session")
async def exp_with_analytics_stub(
    redis_url: str, analytics_server
) -> AsyncIterator[pb_grpc.ExperimentsServiceStub]:
    """An experiments service that reads request-level metrics from that analytics service."""
    settings = ExperimentsSettings(
        port=0,
        redis_url=redis_url,
        shutdown_grace_seconds=1,
        analytics_addr=f"127.0.0.1:{analytics_server.port}",
    )
    redis = connect(redis_url)
    server, store = create_server(settings, redis)
    await server.start()
    await server.set_ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield pb_grpc.ExperimentsServiceStub(chan)
    await server.stop()
    store.close()
    await redis.aclose()
