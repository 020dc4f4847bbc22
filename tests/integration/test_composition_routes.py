"""The gateway's /composition routes over the real inference service (real model, real
adapters, real Redis): hot-swap, rollback and cache statistics as a tenant sees them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from gateway.settings import GatewaySettings
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.channels import open_channel
from services.common.redis import connect
from tests.helpers import register
from tests.unit.gateway.fake_inference import assert_error

pytestmark = pytest.mark.integration

ADMIN_KEY = "composition-test-admin-key"
NAME = "support"

Tenant = tuple[str, dict[str, str]]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)  # not flushed: the inference session's registry lives there
    yield client
    await client.aclose()


@pytest.fixture
async def client(inference, redis) -> AsyncIterator[httpx.AsyncClient]:
    server, _ = inference
    addr = f"127.0.0.1:{server.port}"
    channel = open_channel(addr)
    settings = GatewaySettings(
        **{"loraplex_admin_key": ADMIN_KEY}, inference_addr=addr, request_timeout_seconds=30
    )
    app = create_app(settings, redis=redis, inference_channel=channel)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c
    await channel.close()


@pytest.fixture
def new_tenant(redis) -> Callable[[], Awaitable[Tenant]]:
    async def make() -> Tenant:
        tenant = f"t-{uuid.uuid4().hex[:10]}"
        store = TenantKeyStore(redis)
        await store.create_tenant(tenant)
        issued = await store.create_key(tenant)
        return tenant, {"Authorization": f"Bearer {issued.api_key}"}

    return make


async def serving_version(stub, tenant: str, name: str = NAME) -> int:
    request = pb.GenerateRequest(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name=name),
        prompt="Customer: hi\nAgent:",
        params=pb.SamplingParams(max_new_tokens=1, temperature=0.0),
    )
    return (await stub.Generate(request)).adapter.version


def reason(error: dict) -> str:
    return error["details"][0]["reason"]


# A refused swap is gRPC FAILED_PRECONDITION: HTTP 400 with that status; its reason says why.
REFUSED = (400, "FAILED_PRECONDITION")


async def test_swap_and_rollback_through_the_gateway(client, stub, new_tenant):
    tenant, key = await new_tenant()
    v1 = await register(stub, tenant, "retailer")
    v2 = await register(stub, tenant, "bank")

    swapped = await client.post(
        "/composition/swap",
        json={"adapter": NAME, "version": 1, "expected_sha256": v1.sha256},
        headers=key,
    )
    assert swapped.status_code == 200, swapped.text
    body = swapped.json()
    assert body["previous"]["version"] == 2 and body["previous"]["sha256"] == v2.sha256
    assert body["current"]["version"] == 1 and body["current"]["tenant"] == tenant
    assert body["swapped_at"].endswith("Z")
    assert await serving_version(stub, tenant) == 1

    rolled = await client.post("/composition/rollback", json={"adapter": NAME}, headers=key)
    assert rolled.status_code == 200, rolled.text
    assert (rolled.json()["previous"]["version"], rolled.json()["current"]["version"]) == (1, 2)
    assert await serving_version(stub, tenant) == 2

    # Registering v2 had put v1 on the history too: one more step back, then nothing.
    again = await client.post("/composition/rollback", json={"adapter": NAME}, headers=key)
    assert again.json()["current"]["version"] == 1
    last = await client.post("/composition/rollback", json={"adapter": NAME}, headers=key)
    assert reason(assert_error(last, *REFUSED)) == "NO_PREVIOUS_VERSION"
    assert await serving_version(stub, tenant) == 1


async def test_a_wrong_sha256_is_refused_and_the_old_version_keeps_serving(
    client, stub, new_tenant
):
    tenant, key = await new_tenant()
    await register(stub, tenant, "retailer")
    await register(stub, tenant, "bank")
    refused = await client.post(
        "/composition/swap",
        json={"adapter": NAME, "version": 1, "expected_sha256": "a" * 64},
        headers=key,
    )
    error = assert_error(refused, *REFUSED)
    assert reason(error) == "SHA256_MISMATCH"
    assert await serving_version(stub, tenant) == 2
    malformed = await client.post(
        "/composition/swap",
        json={"adapter": NAME, "version": 1, "expected_sha256": "abc"},
        headers=key,
    )
    assert reason(assert_error(malformed, 400, "INVALID_ARGUMENT")) == "BAD_SHA256"


async def test_a_tenant_cannot_swap_what_is_not_its_own(client, stub, new_tenant):
    tenant, key = await new_tenant()
    other, _ = await new_tenant()
    await register(stub, tenant, "retailer")
    await register(stub, other, "bank", name="theirs")
    await register(stub, other, "retailer", name="theirs")
    shared = f"shared-{uuid.uuid4().hex[:8]}"
    await register(stub, "", "bank", name=shared, shared=True)
    await register(stub, "", "airline", name=shared, shared=True)

    for adapter, version in (("theirs", 1), (shared, 1), ("nobody-has-this", 1), (NAME, 9)):
        swap = await client.post(
            "/composition/swap", json={"adapter": adapter, "version": version}, headers=key
        )
        assert reason(assert_error(swap, 404, "NOT_FOUND")) == "ADAPTER_NOT_FOUND"
    for adapter in ("theirs", shared):
        rollback = await client.post(
            "/composition/rollback", json={"adapter": adapter}, headers=key
        )
        assert reason(assert_error(rollback, 404, "NOT_FOUND")) == "ADAPTER_NOT_FOUND"
    assert await serving_version(stub, other, "theirs") == 2
    assert await serving_version(stub, tenant, shared) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"version": 1},
        {"adapter": "", "version": 1},
        {"adapter": NAME},
        {"adapter": NAME, "version": 0},
        {"adapter": NAME, "version": 2**32},
        {"adapter": NAME, "version": "latest"},
        {"adapter": NAME, "version": 1, "sha256": "typo for expected_sha256"},
    ],
)
async def test_bad_swap_bodies_are_400(client, new_tenant, body):
    _, key = await new_tenant()
    response = await client.post("/composition/swap", json=body, headers=key)
    assert reason(assert_error(response, 400, "INVALID_ARGUMENT")) == "INVALID_ARGUMENT"


async def test_bad_rollback_body_and_adapter_name_are_400(client, new_tenant):
    _, key = await new_tenant()
    empty = await client.post("/composition/rollback", json={}, headers=key)
    assert_error(empty, 400, "INVALID_ARGUMENT")
    bad_name = await client.post("/composition/rollback", json={"adapter": "../x"}, headers=key)
    assert reason(assert_error(bad_name, 400, "INVALID_ARGUMENT")) == "INVALID_ADAPTER_NAME"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/composition/swap", {"adapter": NAME, "version": 1}),
        ("POST", "/composition/rollback", {"adapter": NAME}),
        ("GET", "/composition/stats", None),
    ],
)
@pytest.mark.parametrize("token", [None, "not-a-key", ADMIN_KEY])
async def test_composition_routes_need_a_tenant_key(client, method, path, body, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await client.request(method, path, json=body, headers=headers)
    if token == ADMIN_KEY:  # the admin key acts only for a tenant X-Loraplex-Tenant names
        assert reason(assert_error(response, 400, "INVALID_ARGUMENT")) == "TENANT_REQUIRED"
    else:
        assert_error(response, 401, "UNAUTHENTICATED")


async def test_stats_show_the_cache_with_only_the_callers_and_platform_adapters(
    client, stub, new_tenant
):
    tenant, key = await new_tenant()
    other, _ = await new_tenant()
    await register(stub, tenant, "retailer")
    await register(stub, tenant, "bank")
    await register(stub, other, "airline", name="secret")
    shared = f"shared-{uuid.uuid4().hex[:8]}"
    await register(stub, "", "bank", name=shared, shared=True)
    for owner, name in ((tenant, NAME), (other, "secret"), (tenant, shared)):
        ref = common_pb2.AdapterRef(name=name)
        await stub.LoadAdapter(pb.LoadAdapterRequest(tenant=owner, adapter=ref))
    swap = await client.post("/composition/swap", json={"adapter": NAME, "version": 1}, headers=key)
    assert swap.status_code == 200, swap.text

    response = await client.get("/composition/stats", headers=key)

    assert response.status_code == 200, response.text
    stats = response.json()
    everything = await stub.CacheStats(pb.CacheStatsRequest())
    assert stats["capacity_bytes"] == everything.capacity_bytes > 0
    assert isinstance(stats["used_bytes"], int) and stats["entries"] == everything.entries
    listed = {(a["tenant"], a["name"], a["version"]) for a in stats["adapters"]}
    # Both versions are warm: 2 was loaded, 1 was prefetched by the swap.
    assert {(tenant, NAME, 1), (tenant, NAME, 2), ("", shared, 1)} <= listed
    assert all(t in (tenant, "") for t, _, _ in listed)
    assert (other, "secret", 1) in {(a.tenant, a.name, a.version) for a in everything.adapters}
