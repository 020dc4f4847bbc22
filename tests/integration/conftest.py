"""Real gRPC servers (inference with the real model; analytics) on free ports, on the
session's real Redis, one each per session.

Every integration test runs twice: on a single redis-server and on a Redis Cluster of 3
masters (`redis_url` is parametrized; pytest groups the tests by it, so each session-wide
server starts once per kind). On both, no command may span hash slots (tests/slots.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.analytics.app import create_server as create_analytics_server
from services.analytics.settings import AnalyticsSettings
from services.common.redis import connect
from services.common.server import Server
from services.inference.app import create_server
from services.inference.core import InferenceCore
from services.inference.settings import InferenceSettings
from tests.slots import cross_slot_commands


@pytest.fixture(scope="session", params=["single", "cluster"])
def redis_url(request) -> str:
    """The single redis-server's URL, then the cluster's."""
    return request.getfixturevalue(f"{request.param}_redis_url")


@pytest.fixture(scope="session")
def _cross_slot_log():
    with cross_slot_commands() as seen:
        yield seen


@pytest.fixture(autouse=True)
def no_cross_slot_commands(_cross_slot_log):
    """Fails the test during which any command (of a test or a server) spanned slots."""
    start = len(_cross_slot_log)
    yield
    assert _cross_slot_log[start:] == [], "commands whose keys span hash slots"


@pytest.fixture(scope="session")
async def inference(
    redis_url: str, tmp_path_factory
) -> AsyncIterator[tuple[Server, InferenceCore]]:
    settings = InferenceSettings(
        port=0,
        redis_url=redis_url,
        adapter_store_dir=tmp_path_factory.mktemp("adapter-store"),
        shutdown_grace_seconds=1,
    )
    redis = connect(redis_url)
    server, core = create_server(settings, redis)
    await server.start()
    await core.start()
    await server.set_ready()
    yield server, core
    await server.stop()
    core.close()
    await redis.aclose()


@pytest.fixture(scope="session")
async def channel(inference) -> AsyncIterator[grpc.aio.Channel]:
    server, _ = inference
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
async def analytics_server(redis_url: str) -> AsyncIterator:
    settings = AnalyticsSettings(
        port=0, redis_url=redis_url, shutdown_grace_seconds=1, max_batch_events=2_000
    )
    redis = connect(redis_url)
    server, core = create_analytics_server(settings, redis)
    await server.start()
    await core.ping()
    await server.set_ready()
    yield server
    await server.stop()
    await redis.aclose()


@pytest.fixture(scope="session")
async def analytics_stub(analytics_server) -> AsyncIterator[apb_grpc.AnalyticsServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{analytics_server.port}") as channel:
        yield apb_grpc.AnalyticsServiceStub(channel)
