"""Admin routes: tenants, keys, adapter uploads, cache stats."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from gateway.app import create_app
from tests.unit.gateway.fake_inference import (
    FakeInference,
    FakeInferenceServer,
    NewTenant,
    assert_error,
    gateway_settings,
)

CONFIG = b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
WEIGHTS = b"\x00safetensors-bytes\xff"


def adapter_files() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", ("my-adapter/adapter_config.json", CONFIG, "application/json")),
        ("files", ("C:\\out\\adapter_model.safetensors", WEIGHTS, "application/octet-stream")),
    ]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "ADMIN_KEY_INVALID"),
        ({"Authorization": "Bearer not-the-admin-key"}, "ADMIN_KEY_INVALID"),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, "ADMIN_KEY_INVALID"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/tenants"),
        ("POST", "/admin/tenants/bank/keys"),
        ("GET", "/admin/cache"),
    ],
)
async def test_admin_routes_need_the_admin_key(
    client: httpx.AsyncClient,
    fake: FakeInference,
    headers: dict[str, str],
    reason: str,
    method: str,
    path: str,
) -> None:
    error = assert_error(
        await client.request(method, path, headers=headers), 401, "UNAUTHENTICATED"
    )
    assert error["details"][0]["reason"] == reason
    assert not fake.requests["CacheStats"]


async def test_a_tenant_key_is_not_an_admin_key(
    client: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    bank = await new_tenant("bank")
    assert_error(await client.get("/admin/tenants", headers=bank), 401, "UNAUTHENTICATED")


async def test_tenant_lifecycle_and_its_key_works(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    created = await client.post("/admin/tenants", json={"tenant": "bank"}, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["tenant"] == "bank"

    again = await client.post("/admin/tenants", json={"tenant": "bank"}, headers=admin)
    assert assert_error(again, 409, "ALREADY_EXISTS")["details"][0]["reason"] == "TENANT_EXISTS"
    bad = await client.post("/admin/tenants", json={"tenant": "Bad/Name"}, headers=admin)
    assert assert_error(bad, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == "INVALID_TENANT"

    listed = await client.get("/admin/tenants", headers=admin)
    assert [t["tenant"] for t in listed.json()["tenants"]] == ["bank"]

    issued = await client.post("/admin/tenants/bank/keys", headers=admin)
    assert issued.status_code == 201, issued.text
    api_key = issued.json()["api_key"]
    assert issued.json()["tenant"] == "bank"
    tenant_headers = {"Authorization": f"Bearer {api_key}"}
    assert (await client.get("/v1/models", headers=tenant_headers)).status_code == 200

    key_id = issued.json()["key_id"]
    keys = await client.get("/admin/tenants/bank/keys", headers=admin)
    assert keys.json()["key_ids"] == [key_id]
    assert api_key not in keys.text

    revoked = await client.delete(f"/admin/tenants/bank/keys/{key_id}", headers=admin)
    assert revoked.status_code == 204
    assert_error(await client.get("/v1/models", headers=tenant_headers), 401, "UNAUTHENTICATED")


async def test_key_for_unknown_tenant_is_404(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    response = await client.post("/admin/tenants/ghost/keys", headers=admin)
    assert assert_error(response, 404, "NOT_FOUND")["details"][0]["reason"] == "TENANT_NOT_FOUND"


async def test_upload_tenant_adapter(
    client: httpx.AsyncClient, admin: dict[str, str], fake: FakeInference, new_tenant: NewTenant
) -> None:
    await new_tenant("bank")
    response = await client.post(
        "/admin/tenants/bank/adapters",
        data={"name": "fraud", "version": "2", "sha256": "ab" * 32},
        files=adapter_files(),
        headers=admin,
    )
    assert response.status_code == 201, response.text
    got = response.json()
    assert (got["tenant"], got["name"], got["version"], got["shared"]) == (
        "bank",
        "fraud",
        2,
        False,
    )
    assert got["size_bytes"] == len(CONFIG) + len(WEIGHTS)  # a number, not proto JSON's string
    assert got["created_at"].endswith("Z")

    (sent,) = fake.requests["RegisterAdapter"]
    assert (sent.tenant, sent.name, sent.version, sent.shared) == ("bank", "fraud", 2, False)
    assert sent.expected_sha256 == "ab" * 32
    assert {f.name: f.content for f in sent.files} == {
        "adapter_config.json": CONFIG,
        "adapter_model.safetensors": WEIGHTS,
    }


async def test_upload_shared_adapter(
    client: httpx.AsyncClient, admin: dict[str, str], fake: FakeInference
) -> None:
    response = await client.post(
        "/admin/shared-adapters", data={"name": "summarize"}, files=adapter_files(), headers=admin
    )
    assert response.status_code == 201, response.text
    assert response.json()["shared"] is True
    (sent,) = fake.requests["RegisterAdapter"]
    assert (sent.tenant, sent.name, sent.version, sent.shared) == ("", "summarize", 0, True)


async def test_upload_for_unknown_tenant_is_404_and_never_reaches_inference(
    client: httpx.AsyncClient, admin: dict[str, str], fake: FakeInference
) -> None:
    response = await client.post(
        "/admin/tenants/ghost/adapters", data={"name": "x"}, files=adapter_files(), headers=admin
    )
    assert_error(response, 404, "NOT_FOUND")
    assert not fake.requests["RegisterAdapter"]


@pytest.mark.parametrize(
    ("data", "files"),
    [
        ({}, adapter_files()),  # no name
        ({"name": "fraud"}, None),  # no files
        ({"name": "fraud", "version": "-1"}, adapter_files()),
        (
            {"name": "fraud"},
            [
                ("files", ("a/x.json", b"1", "text/plain")),
                ("files", ("b/x.json", b"2", "text/plain")),
            ],
        ),
    ],
)
async def test_malformed_uploads_are_400(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    fake: FakeInference,
    new_tenant: NewTenant,
    data: dict[str, str],
    files: list | None,
) -> None:
    await new_tenant("bank")
    response = await client.post(
        "/admin/tenants/bank/adapters", data=data, files=files, headers=admin
    )
    assert_error(response, 400, "INVALID_ARGUMENT")
    assert not fake.requests["RegisterAdapter"]


async def test_cache_stats(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    response = await client.get("/admin/cache", headers=admin)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["capacity_bytes"] == 2**33
    assert (got["hits"], got["misses"], got["evictions"]) == (10, 2, 0)
    assert got["adapters"] == [
        {"tenant": "bank", "name": "fraud", "version": 2, "size_bytes": 1234, "hits": 0}
    ]


async def test_admin_api_is_off_without_an_admin_key(
    inference: FakeInferenceServer,
    redis_client: aioredis.Redis,
    channel: grpc.aio.Channel,
    admin: dict[str, str],
) -> None:
    settings = gateway_settings(inference.addr).model_copy(update={"admin_key": None})
    app = create_app(settings, redis=redis_client, inference_channel=channel)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/admin/tenants", headers=admin)
    error = assert_error(response, 401, "UNAUTHENTICATED")
    assert error["details"][0]["reason"] == "ADMIN_DISABLED"


async def test_body_limits_leave_room_for_adapter_uploads_only(
    inference: FakeInferenceServer,
    redis_client: aioredis.Redis,
    channel: grpc.aio.Channel,
    admin: dict[str, str],
    new_tenant: NewTenant,
) -> None:
    settings = gateway_settings(inference.addr).model_copy(
        update={"max_request_bytes": 1000, "max_upload_bytes": 100_000}
    )
    app = create_app(settings, redis=redis_client, inference_channel=channel)
    bank = await new_tenant("bank")
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        too_big = await client.post(
            "/v1/completions", json={"model": "m", "prompt": "x" * 2000}, headers=bank
        )

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
            yield b'{"model": "m", "prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        streamed = await client.post(
            "/v1/completions",
            content=chunks(),
            headers=bank | {"Content-Type": "application/json"},
        )
        upload = await client.post(
            "/admin/tenants/bank/adapters",
            data={"name": "big"},
            files=[("files", ("adapter_model.safetensors", b"\0" * 50_000, "x/y"))],
            headers=admin,
        )
        huge = await client.post(
            "/admin/tenants/bank/adapters",
            data={"name": "huge"},
            files=[("files", ("adapter_model.safetensors", b"\0" * 200_000, "x/y"))],
            headers=admin,
        )
    assert_error(too_big, 413, "INVALID_ARGUMENT")
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413, "INVALID_ARGUMENT")
    assert upload.status_code == 201, upload.text
    assert_error(huge, 413, "INVALID_ARGUMENT")
