"""vLLM's load/unload routes at the gateway: who may call them, which paths they read (only
inside LORA_LOAD_DIR, no `..` or symlink way out, safetensors only), and the embeddings
route's refusals, all before any RPC. The real service behind them: tests/e2e."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from gateway.app import create_app
from tests.unit.gateway.fake_inference import (
    ADMIN_KEY,
    FakeInference,
    FakeInferenceServer,
    NewTenant,
    assert_error,
    gateway_settings,
)

CONFIG = b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
WEIGHTS = b"\x00safetensors-bytes\xff"
MAX_UPLOAD = 1000
LOAD = "/v1/load_lora_adapter"


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    write_adapter(root / "good")
    return root


def write_adapter(directory: Path, weights: bytes = WEIGHTS) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_bytes(CONFIG)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


@pytest.fixture
async def lora_client(
    inference: FakeInferenceServer,
    redis_client: aioredis.Redis,
    channel: grpc.aio.Channel,
    allowed: Path,
) -> AsyncIterator[httpx.AsyncClient]:
    settings = gateway_settings(inference.addr).model_copy(
        update={"lora_load_dir": allowed, "max_upload_bytes": MAX_UPLOAD}
    )
    app = create_app(settings, redis=redis_client, inference_channel=channel)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


@pytest.fixture
async def bank_admin(new_tenant: NewTenant) -> dict[str, str]:
    await new_tenant("bank")
    return {"Authorization": f"Bearer {ADMIN_KEY}", "X-Loraplex-Tenant": "bank"}


async def test_loading_reads_the_directory_and_registers_it_for_the_named_tenant(
    lora_client: httpx.AsyncClient, bank_admin: dict[str, str], fake: FakeInference, allowed: Path
) -> None:
    for path in ("good", str(allowed / "good"), "good/../good"):
        body = {"lora_name": "sql", "lora_path": path}
        response = await lora_client.post(LOAD, json=body, headers=bank_admin)
        assert response.status_code == 200, response.text
        assert response.json()["message"] == "Success: LoRA adapter 'sql' added successfully."
    sent = fake.requests["RegisterAdapter"]
    assert len(sent) == 3
    assert {(r.tenant, r.name, r.shared) for r in sent} == {("bank", "sql", False)}
    assert {f.name: f.content for f in sent[0].files} == {
        "adapter_config.json": CONFIG,
        "adapter_model.safetensors": WEIGHTS,
    }
    audit = await lora_client.get(
        "/admin/audit", headers={"Authorization": bank_admin["Authorization"]}
    )
    paths = [e["path"] for e in audit.json()["entries"] if e["tenant"] == "bank"]
    assert paths.count(LOAD) == 3


async def test_paths_that_leave_the_allowed_directory_are_refused(
    lora_client: httpx.AsyncClient,
    bank_admin: dict[str, str],
    fake: FakeInference,
    allowed: Path,
    tmp_path: Path,
) -> None:
    outside = write_adapter(tmp_path / "outside")
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_bytes(CONFIG)
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for path in ("../outside", str(outside), "link", "good/../../outside", "sneaky", "/"):
        body = {"lora_name": "sql", "lora_path": path}
        response = await lora_client.post(LOAD, json=body, headers=bank_admin)
        error = assert_error(response, 403, "PERMISSION_DENIED")
        assert error["details"][0]["reason"] == "LORA_PATH_OUTSIDE_DIR", path
    assert not fake.requests["RegisterAdapter"]


@pytest.mark.parametrize(
    ("setup", "http", "reason"),
    [
        ("missing", 404, "LORA_PATH_NOT_FOUND"),
        ("pickle", 400, "PICKLE_REFUSED"),
        ("no-config", 400, "MISSING_FILE"),
        ("too-large", 400, "LORA_FILE_TOO_LARGE"),
        ("nul", 400, "BAD_INPUT"),
    ],
)
async def test_directories_without_a_loadable_adapter_are_refused(
    lora_client: httpx.AsyncClient,
    bank_admin: dict[str, str],
    fake: FakeInference,
    allowed: Path,
    setup: str,
    http: int,
    reason: str,
) -> None:
    if setup == "pickle":
        (allowed / setup).mkdir()
        (allowed / setup / "adapter_config.json").write_bytes(CONFIG)
        (allowed / setup / "adapter_model.bin").write_bytes(b"pickle")
    elif setup == "no-config":
        write_adapter(allowed / setup)
        (allowed / setup / "adapter_config.json").unlink()
    elif setup == "too-large":
        write_adapter(allowed / setup, weights=b"x" * (MAX_UPLOAD + 1))
    path = "bad\x00dir" if setup == "nul" else setup
    body = {"lora_name": "sql", "lora_path": path}
    response = await lora_client.post(LOAD, json=body, headers=bank_admin)
    error = assert_error(response, http, "NOT_FOUND" if http == 404 else "INVALID_ARGUMENT")
    assert error["details"][0]["reason"] == reason
    assert not fake.requests["RegisterAdapter"]


async def test_without_lora_load_dir_the_route_refuses(
    client: httpx.AsyncClient, bank_admin: dict[str, str], fake: FakeInference
) -> None:
    body = {"lora_name": "sql", "lora_path": "good"}
    response = await client.post(LOAD, json=body, headers=bank_admin)
    error = assert_error(response, 400, "FAILED_PRECONDITION")
    assert error["details"][0]["reason"] == "LORA_LOAD_DIR_UNSET"
    assert "LORA_LOAD_DIR" in error["message"]
    assert not fake.requests["RegisterAdapter"]


@pytest.mark.parametrize("route", [LOAD, "/v1/unload_lora_adapter"])
async def test_only_the_admin_key_acting_for_a_tenant_may_load_or_unload(
    lora_client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference, route: str
) -> None:
    tenant_key = await new_tenant("bank")
    body = {"lora_name": "sql", "lora_path": "good"}
    if route != LOAD:
        del body["lora_path"]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cases = [
        (tenant_key, 403, "KEY_SCOPE"),
        ({}, 401, "API_KEY_MISSING"),
        ({"Authorization": "Bearer nope"}, 401, "API_KEY_INVALID"),
        (admin, 400, "TENANT_REQUIRED"),
        (admin | {"X-Loraplex-Tenant": "nobody"}, 404, "TENANT_NOT_FOUND"),
    ]
    for headers, http, reason in cases:
        response = await lora_client.post(route, json=body, headers=headers)
        assert response.status_code == http, (headers, response.text)
        assert response.json()["error"]["details"][0]["reason"] == reason
    assert not fake.requests["RegisterAdapter"] and not fake.requests["UnloadAdapter"]


async def test_vllm_options_loraplex_does_not_implement_are_refused_by_name(
    lora_client: httpx.AsyncClient, bank_admin: dict[str, str], new_tenant: NewTenant
) -> None:
    body = {"lora_name": "sql", "lora_path": "good", "load_inplace": True}
    response = await lora_client.post(LOAD, json=body, headers=bank_admin)
    assert "load_inplace" in assert_error(response, 400, "INVALID_ARGUMENT")["message"]
    bank = await new_tenant("bank2")
    body = {"model": "tiny-base", "prompt": "hi", "chat_template": "{{x}}"}
    response = await lora_client.post("/tokenize", json=body, headers=bank)
    assert "chat_template" in assert_error(response, 400, "INVALID_ARGUMENT")["message"]
    both = {"model": "tiny-base", "prompt": "hi", "messages": [{"role": "user", "content": "x"}]}
    response = await lora_client.post("/tokenize", json=both, headers=bank)
    assert "prompt" in assert_error(response, 400, "INVALID_ARGUMENT")["message"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"encoding_format": "binary"}, "encoding_format"),
        ({"dimensions": 8}, "dimensions"),
        ({"input": ["text", 3]}, "input"),
        ({"input": [-1]}, "input"),
        ({"truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
    ],
)
async def test_embedding_options_that_cannot_be_honoured_are_400_naming_them(
    client: httpx.AsyncClient,
    new_tenant: NewTenant,
    fake: FakeInference,
    overrides: dict,
    field: str,
) -> None:
    bank = await new_tenant("bank")
    body = {"model": "tiny-base", "input": "hello"} | overrides
    response = await client.post("/v1/embeddings", json=body, headers=bank)
    assert field in assert_error(response, 400, "INVALID_ARGUMENT")["message"]
    assert not fake.requests["Embed"] and not fake.requests["EmbedTokens"]
