"""Per-tenant and per-key limits in Redis: 429 with Retry-After past a request rate or a
token budget, a max_tokens ceiling per request, each tenant on its own buckets."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.limits import RateLimiter, TenantLimits
from services.common.errors import ResourceExhausted
from tests.unit.gateway.fake_inference import (
    ADMIN_KEY,
    BASE_MODEL,
    FakeInference,
    NewTenant,
    assert_error,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def completion(**overrides) -> dict:
    return {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 4} | overrides


async def set_limits(client: httpx.AsyncClient, tenant: str, **limits) -> None:
    response = await client.put(f"/admin/tenants/{tenant}/limits", headers=ADMIN, json=limits)
    assert response.status_code == 200, response.text


async def test_a_tenant_over_its_request_rate_gets_429_with_retry_after(
    client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference
) -> None:
    bank = await new_tenant("bank")
    shop = await new_tenant("shop")
    await set_limits(client, "bank", requests_per_second=0.5, requests_burst=3)
    codes = [
        (await client.post("/v1/completions", headers=bank, json=completion())).status_code
        for _ in range(5)
    ]
    assert codes == [200, 200, 200, 429, 429]
    refused = await client.post("/v1/completions", headers=bank, json=completion())
    error = assert_error(refused, 429, "RESOURCE_EXHAUSTED")
    assert error["details"][0]["reason"] == "RATE_LIMITED"
    assert 1 <= int(refused.headers["Retry-After"]) <= 2  # one request at 0.5/s
    assert len(fake.requests["Generate"]) == 3  # refused requests cost nothing
    # Another tenant is untouched.
    assert (
        await client.post("/v1/completions", headers=shop, json=completion())
    ).status_code == 200


async def test_each_key_has_its_own_rate_within_the_tenants(
    client: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    first = await new_tenant("bank")
    created = await client.post("/admin/tenants/bank/keys", headers=ADMIN)
    second = {"Authorization": f"Bearer {created.json()['api_key']}"}
    await set_limits(client, "bank", key_requests_per_second=0.1, key_requests_burst=1)
    assert (await client.get("/v1/models", headers=first)).status_code == 200
    assert (await client.get("/v1/models", headers=first)).status_code == 429
    assert (await client.get("/v1/models", headers=second)).status_code == 200


async def test_the_token_budget_is_charged_by_use_and_then_refuses(
    client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference
) -> None:
    bank = await new_tenant("bank")
    await set_limits(client, "bank", tokens_per_minute=30)
    used = 0
    for _ in range(20):
        response = await client.post("/v1/completions", headers=bank, json=completion())
        if response.status_code == 429:
            break
        assert response.status_code == 200
        used += response.json()["usage"]["total_tokens"]
        await asyncio.sleep(0.05)  # the charge is made off the request path
    error = assert_error(response, 429, "RESOURCE_EXHAUSTED")
    assert error["details"][0]["reason"] == "TOKEN_BUDGET_EXHAUSTED"
    assert 30 <= used < 30 + 20  # refused once the budget went below zero, not before
    assert int(response.headers["Retry-After"]) >= 1


async def test_max_tokens_over_the_tenants_ceiling_is_400_and_unset_is_capped(
    client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference
) -> None:
    bank = await new_tenant("bank")
    await set_limits(client, "bank", max_tokens_per_request=8)
    over = await client.post("/v1/completions", headers=bank, json=completion(max_tokens=9))
    error = assert_error(over, 400, "INVALID_ARGUMENT")
    assert error["details"][0]["reason"] == "MAX_TOKENS_OVER_LIMIT"
    chat = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", headers=bank, json=chat)).status_code == 200
    assert fake.requests["Generate"][-1].params.max_new_tokens == 8


@pytest.mark.parametrize("bad", [{"requests_per_second": -1}, {"tokens_per_minute": 2**40}])
async def test_bad_limits_are_400(client, new_tenant: NewTenant, bad) -> None:
    await new_tenant("bank")
    response = await client.put("/admin/tenants/bank/limits", headers=ADMIN, json=bad)
    assert_error(response, 400, "INVALID_ARGUMENT")


async def test_limits_are_read_back_with_defaults_filled_in(client, new_tenant: NewTenant) -> None:
    await new_tenant("bank")
    await set_limits(client, "bank", tokens_per_minute=100)
    got = (await client.get("/admin/tenants/bank/limits", headers=ADMIN)).json()
    assert got == {**vars(TenantLimits()), "tokens_per_minute": 100}


async def test_the_bucket_refills_at_its_rate(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client, TenantLimits(requests_per_second=20, requests_burst=1))
    await limiter.admit("refill", "k" * 64)
    with pytest.raises(ResourceExhausted):
        await limiter.admit("refill", "k" * 64)
    await asyncio.sleep(0.1)  # 1/20 s refills one request; twice that for a noisy machine
    await limiter.admit("refill", "k" * 64)
