"""Gateway unit-test fixtures: the real app over real Redis and the fake inference service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from services.common.channels import open_channel
from tests.unit.gateway.fake_inference import (
    ADMIN_KEY,
    FakeInference,
    FakeInferenceServer,
    NewTenant,
    gateway_settings,
    serve_fake_inference,
)


@pytest.fixture
async def inference() -> AsyncIterator[FakeInferenceServer]:
    async with serve_fake_inference() as server:
        yield server


@pytest.fixture
def fake(inference: FakeInferenceServer) -> FakeInference:
    return inference.fake


@pytest.fixture
async def channel(inference: FakeInferenceServer) -> AsyncIterator[grpc.aio.Channel]:
    ch = open_channel(inference.addr)
    yield ch
    await ch.close()


@pytest.fixture
def app(
    inference: FakeInferenceServer, redis_client: aioredis.Redis, channel: grpc.aio.Channel
) -> FastAPI:
    return create_app(
        gateway_settings(inference.addr), redis=redis_client, inference_channel=channel
    )


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: a crash must reach the test as the 500 a user would get.
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


@pytest.fixture
def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def new_tenant(redis_client: aioredis.Redis) -> NewTenant:
    """Creates a tenant and an API key; returns the headers that authenticate as it."""
    store = TenantKeyStore(redis_client)

    async def make(tenant: str) -> dict[str, str]:
        await store.create_tenant(tenant)
        issued = await store.create_key(tenant)
        return {"Authorization": f"Bearer {issued.api_key}"}

    return make
