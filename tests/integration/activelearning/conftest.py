"""A real active-learning gRPC server on a free port, on the session's real Redis, that
forwards feedback to real analytics and experiments servers (also on free ports)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as pb_grpc
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from services.activelearning.app import create_server
from services.activelearning.core import ActiveLearningCore
from services.activelearning.settings import ActiveLearningSettings
from services.analytics.app import create_server as create_analytics
from services.analytics.settings import AnalyticsSettings
from services.common.channels import open_channel
from services.common.redis import connect
from services.common.server import Server
from services.experiments.app import create_server as create_experiments
from services.experiments.settings import ExperimentsSettings


@dataclass
class Servers:
    activelearning: Server
    core: ActiveLearningCore
    analytics: Server
    experiments: Server


@pytest.fixture(scope="session")
async def al_servers(redis_url: str) -> AsyncIterator[Servers]:
    redis = connect(redis_url)
    started: list[Server] = []
    analytics, _ = create_analytics(
        AnalyticsSettings(port=0, redis_url=redis_url, shutdown_grace_seconds=0.5), redis
    )
    experiments, _ = create_experiments(
        ExperimentsSettings(port=0, redis_url=redis_url, shutdown_grace_seconds=0.5), redis
    )
    for server in (analytics, experiments):
        await server.start()
        await server.set_ready()
        started.append(server)
    channels = [open_channel(f"127.0.0.1:{s.port}") for s in (analytics, experiments)]
    settings = ActiveLearningSettings(
        port=0, redis_url=redis_url, shutdown_grace_seconds=0.5, lease_seconds=60
    )
    server, core = create_server(
        settings, redis, analytics_channel=channels[0], experiments_channel=channels[1]
    )
    await server.start()
    assert core.forwarder is not None
    core.forwarder.start()
    await server.set_ready()
    yield Servers(server, core, analytics, experiments)
    await server.stop()
    await core.forwarder.close()
    for channel in channels:
        await channel.close()
    for s in started:
        await s.stop()
    await redis.aclose()


@pytest.fixture(scope="session")
async def al_stub(al_servers: Servers) -> AsyncIterator[pb_grpc.ActiveLearningServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{al_servers.activelearning.port}") as ch:
        yield pb_grpc.ActiveLearningServiceStub(ch)


@pytest.fixture(scope="session")
async def analytics_stub(al_servers: Servers) -> AsyncIterator[apb_grpc.AnalyticsServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{al_servers.analytics.port}") as ch:
        yield apb_grpc.AnalyticsServiceStub(ch)


@contextlib.asynccontextmanager
async def al_with_inference_server(
    redis_url: str, inference, **overrides
) -> AsyncIterator[tuple[pb_grpc.ActiveLearningServiceStub, ActiveLearningCore]]:
    """A real active-learning server whose inference channel reaches the real inference
    server, with these settings overridden."""
    inference_server, _ = inference
    redis = connect(redis_url)
    channel = open_channel(f"127.0.0.1:{inference_server.port}")
    settings = ActiveLearningSettings(
        port=0, redis_url=redis_url, shutdown_grace_seconds=0.5, **overrides
    )
    server, core = create_server(settings, redis, inference_channel=channel)
    await server.start()
    core.start()
    await server.set_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            yield pb_grpc.ActiveLearningServiceStub(ch), core
    finally:
        await server.stop()
        await core.close()
        await channel.close()
        await redis.aclose()
