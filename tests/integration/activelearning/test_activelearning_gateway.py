"""The REST workflow through the real gateway app over the real inference service (its
model reports per-token statistics): completions become candidates, reviewers lease and
answer them over /feedback, /active-learning/select picks batches, /feedback/export downloads
datasets. The active-learning service is the real one (conftest), on real Redis. Each test
has a tenant of its own, so none depends on another's data or on the order they run in."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from services.common.channels import open_channel
from tests.helpers import new_tenant, register
from tests.unit.gateway.fake_inference import assert_error, gateway_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(
    al_servers, inference, redis_client: aioredis.Redis
) -> AsyncIterator[httpx.AsyncClient]:
    server, _ = inference
    channels = [
        open_channel(f"127.0.0.1:{server.port}"),
        open_channel(f"127.0.0.1:{al_servers.activelearning.port}"),
    ]
    settings = gateway_settings(f"127.0.0.1:{server.port}")
    settings.request_timeout_seconds = 60  # the real model, on a shared CPU
    app = create_app(
        settings,
        redis=redis_client,
        inference_channel=channels[0],
        activelearning_channel=channels[1],
    )
    app.state.gateway.candidates._interval = 0.05  # flush fast in tests
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as c,
    ):
        yield c
    for channel in channels:
        await channel.close()


@pytest.fixture
async def base_model(inference) -> str:
    _, core = inference
    return core.engine.model_id


async def tenant_headers(redis_client: aioredis.Redis, tenant: str) -> dict[str, str]:
    store = TenantKeyStore(redis_client)
    await store.create_tenant(tenant)
    issued = await store.create_key(tenant)
    return {"Authorization": f"Bearer {issued.api_key}"}


async def shop_tenant(redis_client: aioredis.Redis, stub) -> tuple[str, dict[str, str]]:
    """A new tenant with the demo adapter registered as "support"."""
    tenant = new_tenant()
    await register(stub, tenant, "retailer", "support")
    return tenant, await tenant_headers(redis_client, tenant)


async def wait_queued(client, headers, n: int) -> None:
    deadline = time.monotonic() + 10
    while (await client.get("/feedback/stats", headers=headers)).json()["queued"] < n:
        assert time.monotonic() < deadline, "candidates did not arrive"
        await asyncio.sleep(0.05)


async def complete(client, headers, prompt: str, model: str = "support") -> str:
    """The completion's text (greedy: the same on every run)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    reply = await client.post("/v1/completions", headers=headers, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


async def test_completions_queue_by_uncertainty_and_reviewers_answer_over_rest(
    client, redis_client, stub, base_model
):
    _, shop = await shop_tenant(redis_client, stub)
    prompts = [f"Customer: where is my order {n}?\nAgent:" for n in (17, 2048, 5)]
    outputs = {p: await complete(client, shop, p) for p in prompts}
    chat = await client.post(
        "/v1/chat/completions",
        headers=shop,
        json={
            "model": base_model,
            "messages": [{"role": "user", "content": "Hi, can I change my address?"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert chat.status_code == 200, chat.text
    chat_prompt = "user: Hi, can I change my address?"
    outputs[chat_prompt] = chat.json()["choices"][0]["message"]["content"]
    await wait_queued(client, shop, 4)

    leases = []
    for _ in range(4):
        reply = await client.get("/feedback/next", params={"reviewer": "rita"}, headers=shop)
        assert reply.status_code == 200, reply.text
        leases.append(reply.json())
    items = [lease["item"] for lease in leases]
    # The queue hands out the most uncertain first: priority is the entropy score.
    entropies = [item["scores"]["entropy"] for item in items]
    assert entropies == sorted(entropies, reverse=True) and entropies[0] > 0
    assert [item["priority"] for item in items] == pytest.approx(entropies)
    # Each item is what was served: prompt, output, and the adapter that served it.
    assert {item["prompt"]: item["output"] for item in items} == outputs
    for item in items:
        served = item["adapter"]
        if item["prompt"] == chat_prompt:
            assert served["name"] == base_model  # served by the base model
        else:
            assert served == {"name": "support", "version": 1}
    nothing = await client.get("/feedback/next", params={"reviewer": "rita"}, headers=shop)
    assert nothing.json() == {"item": None}

    def body(lease, **kind):
        return {
            "item_id": lease["item"]["id"],
            "reviewer": "rita",
            "lease_id": lease["lease_id"],
        } | kind

    bad = await client.post("/feedback", headers=shop, json=body(leases[0], rating=7))
    assert (
        assert_error(bad, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == "RATING_OUT_OF_RANGE"
    )
    both = await client.post("/feedback", headers=shop, json=body(leases[0], rating=3, thumbs="up"))
    assert (
        assert_error(both, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == "AMBIGUOUS_FEEDBACK"
    )
    none = await client.post("/feedback", headers=shop, json=body(leases[0]))
    assert assert_error(none, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == "MISSING_FEEDBACK"
    other = await client.post(
        "/feedback", headers=shop, json=body(leases[0], rating=3) | {"reviewer": "mallory"}
    )
    assert (
        assert_error(other, 400, "FAILED_PRECONDITION")["details"][0]["reason"] == "LEASE_NOT_HELD"
    )

    answers = [
        body(leases[0], rating=5),
        body(leases[1], thumbs="down"),
        body(leases[2], corrected_text="Your order ships today."),
        body(leases[3], rating=2),
    ]
    for a in answers:
        reply = await client.post("/feedback", headers=shop, json=a)
        assert reply.status_code == 200, reply.text
        assert reply.json()["closed"] is True and reply.json()["feedback_id"]
    again = await client.post("/feedback", headers=shop, json=answers[0])
    assert assert_error(again, 400, "FAILED_PRECONDITION")["details"][0]["reason"] == "ITEM_CLOSED"

    exported = {}
    for fmt in ("sft", "dpo", "kto"):
        reply = await client.get("/feedback/export", params={"format": fmt}, headers=shop)
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/x-ndjson"
        exported[fmt] = [json.loads(line) for line in reply.text.splitlines()]
        assert int(reply.headers["x-loraplex-rows"]) == len(exported[fmt])
    first, corrected = items[0], items[2]
    assert exported["sft"] == [
        {"prompt": first["prompt"], "completion": first["output"]},
        {"prompt": corrected["prompt"], "completion": "Your order ships today."},
    ]
    assert exported["dpo"] == [
        {
            "prompt": corrected["prompt"],
            "chosen": "Your order ships today.",
            "rejected": corrected["output"],
        }
    ]
    assert [(r["prompt"], r["label"]) for r in exported["kto"]] == [
        (first["prompt"], True),
        (items[1]["prompt"], False),
        (corrected["prompt"], True),
        (corrected["prompt"], False),
        (items[3]["prompt"], False),
    ]
    only_base = await client.get(
        "/feedback/export", params={"format": "kto", "adapter": base_model}, headers=shop
    )
    assert [json.loads(x)["prompt"] for x in only_base.text.splitlines()] == [chat_prompt]
    future = await client.get(
        "/feedback/export", params={"format": "sft", "since": "2100-01-01T00:00:00Z"}, headers=shop
    )
    assert future.status_code == 200 and future.text == ""
    stats = (await client.get("/feedback/stats", headers=shop)).json()
    assert stats["closed"] == 4
    assert stats["feedback"] == {"rating": 2, "thumbs": 1, "corrected_text": 1}


async def test_select_over_rest_and_tenant_isolation(client, redis_client, stub):
    _, shop = await shop_tenant(redis_client, stub)
    bank = await tenant_headers(redis_client, new_tenant())
    for n in (3, 14, 9):
        await complete(client, shop, f"Customer: can I get a refund for item {n}?\nAgent:")
    await wait_queued(client, shop, 3)

    async def select(batch_size: int) -> dict:
        body = {"method": "nll", "batch_size": batch_size, "dry_run": True}
        reply = await client.post("/active-learning/select", headers=shop, json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    everything = await select(3)
    # A batch larger than the pool is the whole pool, ranked, as a LIMIT would give it.
    assert (await select(4))["items"] == everything["items"]
    nll = sorted((i["scores"]["nll"] for i in everything["items"]), reverse=True)
    got = await select(2)
    assert got["method"] == "nll" and got["pool_size"] == 3
    # The two most uncertain under nll, most uncertain first.
    assert [i["scores"]["nll"] for i in got["items"]] == pytest.approx(nll[:2])
    for bad, reason in (
        ({"method": "vibes"}, "UNKNOWN_METHOD"),
        ({"strategy": "lucky"}, "UNKNOWN_STRATEGY"),
        ({"batch_size": 0}, "INVALID_BATCH_SIZE"),
    ):
        error = assert_error(
            await client.post("/active-learning/select", headers=shop, json=bad),
            400,
            "INVALID_ARGUMENT",
        )
        assert error["details"][0]["reason"] == reason
    # The sampling methods are named like the others; this service has no inference to
    # sample from.
    error = assert_error(
        await client.post("/active-learning/select", headers=shop, json={"method": "sample_eigv"}),
        400,
        "FAILED_PRECONDITION",
    )
    assert error["details"][0]["reason"] == "SAMPLING_UNAVAILABLE"
    # The bank sees nothing of the shop's.
    assert (await client.get("/feedback/next", params={"reviewer": "b"}, headers=bank)).json() == {
        "item": None
    }
    bank_select = await client.post("/active-learning/select", headers=bank, json={"batch_size": 1})
    assert bank_select.status_code == 200, bank_select.text
    assert (bank_select.json()["items"], bank_select.json()["pool_size"]) == ([], 0)
    bad_format = await client.get("/feedback/export", params={"format": "csv"}, headers=bank)
    assert_error(bad_format, 400, "INVALID_ARGUMENT")


async def test_routes_need_a_key_and_answer_503_without_the_service(client, redis_client):
    assert_error(
        await client.get("/feedback/next", params={"reviewer": "x"}), 401, "UNAUTHENTICATED"
    )
    assert_error(await client.post("/active-learning/select", json={}), 401, "UNAUTHENTICATED")
    app = create_app(
        gateway_settings("127.0.0.1:1"),
        redis=redis_client,
        inference_channel=open_channel("127.0.0.1:1"),
    )
    headers = await tenant_headers(redis_client, new_tenant())
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as bare:
        reply = await bare.get("/feedback/next", params={"reviewer": "x"}, headers=headers)
    assert (
        assert_error(reply, 503, "UNAVAILABLE")["details"][0]["reason"] == "ACTIVELEARNING_DISABLED"
    )
