"""Redis stops: every service answers UNAVAILABLE (REDIS_UNAVAILABLE) through the one
shared interceptor, and the gateway turns that into 503 with Retry-After, not 500 — also
where the gateway itself reads Redis (API keys). No traceback is logged per request.

The services (the real inference service with its model, analytics, experiments, active
learning) run on a Redis of their own that each test stops and restarts; the gateway's API
keys live in the session Redis, except in the test of the gateway's own Redis use."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from services.activelearning.app import create_server as create_activelearning
from services.activelearning.settings import ActiveLearningSettings
from services.analytics.app import create_server as create_analytics
from services.analytics.settings import AnalyticsSettings
from services.common.channels import open_channel
from services.common.redis import connect
from services.experiments.app import create_server as create_experiments
from services.experiments.settings import ExperimentsSettings
from services.inference.app import create_server as create_inference
from services.inference.settings import InferenceSettings
from tests.helpers import StoppableRedis, new_tenant
from tests.unit.gateway.fake_inference import assert_error, gateway_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def services_redis() -> Iterator[StoppableRedis]:
    server = StoppableRedis()
    server.start()
    yield server
    server.stop()


@dataclass
class Stack:
    gateway: httpx.AsyncClient  # API keys in the session Redis (it stays up)
    own_redis_gateway: httpx.AsyncClient  # API keys in services_redis
    session_keys: TenantKeyStore
    services_keys: TenantKeyStore
    services_client: aioredis.Redis  # the services' (and own_redis_gateway's) Redis client


@pytest.fixture(scope="module")
async def stack(
    services_redis: StoppableRedis, redis_url: str, tmp_path_factory
) -> AsyncIterator[Stack]:
    redis = connect(services_redis.url)
    session_redis = connect(redis_url)
    common = {"port": 0, "redis_url": services_redis.url, "shutdown_grace_seconds": 0.5}
    inference, core = create_inference(
        InferenceSettings(**common, adapter_store_dir=tmp_path_factory.mktemp("store")), redis
    )
    analytics, _ = create_analytics(AnalyticsSettings(**common), redis)
    experiments, store = create_experiments(ExperimentsSettings(**common), redis)
    activelearning, _ = create_activelearning(ActiveLearningSettings(**common), redis)
    servers = (inference, analytics, experiments, activelearning)
    for server in servers:
        await server.start()
    await core.start()
    for server in servers:
        await server.set_ready()
    names = ("inference", "analytics", "experiments", "activelearning")
    channels = {
        f"{name}_channel": open_channel(f"127.0.0.1:{server.port}")
        for name, server in zip(names, servers, strict=True)
    }
    settings = gateway_settings(f"127.0.0.1:{inference.port}")
    apps = [create_app(settings, redis=r, **channels) for r in (session_redis, redis)]
    clients = [
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app, raise_app_exceptions=False),
            base_url="http://gateway",
        )
        for app in apps
    ]
    yield Stack(*clients, TenantKeyStore(session_redis), TenantKeyStore(redis), redis)
    for client in clients:
        await client.aclose()
    for channel in channels.values():
        await channel.close()
    for server in servers:
        await server.stop()
    core.close()
    store.close()
    await redis.aclose()
    await session_redis.aclose()


async def tenant_headers(keys: TenantKeyStore) -> dict[str, str]:
    tenant = new_tenant()
    await keys.create_tenant(tenant)
    issued = await keys.create_key(tenant)
    return {"Authorization": f"Bearer {issued.api_key}"}


# (gateway, method, path, JSON body): one call per service that reads Redis to answer.
CALLS = {
    "inference": ("gateway", "POST", "/v1/completions", {"model": "support", "prompt": "Hi"}),
    "analytics": ("gateway", "GET", "/analytics/adapters/support?window=1h", None),
    "experiments": ("gateway", "GET", "/ab-testing/experiments", None),
    "activelearning": ("gateway", "GET", "/feedback/next?reviewer=alice", None),
    "gateway-api-keys": ("own_redis_gateway", "GET", "/v1/models", None),
}


@pytest.mark.parametrize("service", list(CALLS))
async def test_a_redis_outage_is_503_with_a_reason(
    service: str, stack: Stack, services_redis: StoppableRedis, caplog
) -> None:
    which, method, path, body = CALLS[service]
    client: httpx.AsyncClient = getattr(stack, which)
    keys = stack.services_keys if which == "own_redis_gateway" else stack.session_keys
    headers = await tenant_headers(keys)
    before = await client.request(method, path, headers=headers, json=body)
    assert before.status_code < 500, before.text  # served while Redis is up

    services_redis.stop()
    try:
        with caplog.at_level(logging.WARNING):
            during = await client.request(method, path, headers=headers, json=body)
    finally:
        services_redis.start()
    error = assert_error(during, 503, "UNAVAILABLE")
    assert [d.get("reason") for d in error["details"]] == ["REDIS_UNAVAILABLE"]
    assert during.headers["Retry-After"] == "1"
    # An expected outage: at most a warning, never a logged traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]

    # Redis is back (empty: it kept no data): the service answers again, on the first try
    # (the pool replaced the connections the restart closed).
    if which == "own_redis_gateway":
        headers = await tenant_headers(keys)
    after = await client.request(method, path, headers=headers, json=body)
    assert after.status_code < 500, after.text


async def test_a_restarted_redis_costs_no_command_an_error() -> None:
    """kill -9 and a restart: every pooled connection is dead, and none is lent again."""
    server = StoppableRedis()
    server.start()
    client = connect(server.url)
    try:
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(8)))  # 8 pooled
        assert len(client.connection_pool._available_connections) == 8
        server.stop(signal.SIGKILL)
        await asyncio.sleep(0.2)  # a serving process's event loop sees the connections close
        server.start()
        replies = await asyncio.gather(*(client.ping() for _ in range(8)), return_exceptions=True)
        assert replies == [True] * 8
    finally:
        await client.aclose()
        server.stop()
