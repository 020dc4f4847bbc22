"""The REST workflow through the real gateway app: completions (from a fake inference
service that reports per-token statistics) become candidates, reviewers lease and answer
them over /feedback, /active-learning/select picks batches, /feedback/export downloads
datasets. The active-learning service is the real one (conftest), on real Redis."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from gateway.ops_routes import INFERENCE_SERVICE
from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from services.common.channels import open_channel
from services.common.server import Server, ServiceSpec
from services.common.settings import ServiceSettings
from tests.unit.gateway.fake_inference import (
    BASE_MODEL,
    FakeInference,
    adapter_info,
    assert_error,
    gateway_settings,
)

pytestmark = pytest.mark.integration
_ENTROPY = re.compile(r"entropy=([0-9.]+)")


class UncertainInference(FakeInference):
    """The fake's replies plus per-token statistics: a prompt with "entropy=x" gets five
    tokens of entropy x and log-probability -x/2."""

    async def Generate(self, request: ipb.GenerateRequest, context: Any) -> ipb.GenerateResponse:
        reply = await super().Generate(request, context)
        source = request.prompt or request.messages[-1].content
        match = _ENTROPY.search(source)
        x = float(match[1]) if match else 0.5
        reply.token_entropies[:] = [x] * 5
        reply.token_logprobs[:] = [-x / 2] * 5
        return reply


@pytest.fixture
async def client(al_servers, redis_client: aioredis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    fake = UncertainInference()
    fake.adapters.append(adapter_info("shop", "support"))
    spec = ServiceSpec(INFERENCE_SERVICE, fake, ipb_grpc.add_InferenceServiceServicer_to_server)
    inference = Server(ServiceSettings(port=0, shutdown_grace_seconds=0.1), [spec])
    await inference.start()
    await inference.set_ready()
    channels = [
        open_channel(f"127.0.0.1:{inference.port}"),
        open_channel(f"127.0.0.1:{al_servers.activelearning.port}"),
    ]
    app = create_app(
        gateway_settings(f"127.0.0.1:{inference.port}"),
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
    await inference.stop()


async def tenant_headers(redis_client: aioredis.Redis, tenant: str) -> dict[str, str]:
    store = TenantKeyStore(redis_client)
    await store.create_tenant(tenant)
    issued = await store.create_key(tenant)
    return {"Authorization": f"Bearer {issued.api_key}"}


async def wait_queued(client, headers, n: int) -> None:
    deadline = time.monotonic() + 10
    while (await client.get("/feedback/stats", headers=headers)).json()["queued"] < n:
        assert time.monotonic() < deadline, "candidates did not arrive"
        await asyncio.sleep(0.05)


async def complete(client, headers, prompt: str, model: str = "support") -> dict:
    reply = await client.post(
        "/v1/completions", headers=headers, json={"model": model, "prompt": prompt, "max_tokens": 8}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_completions_queue_by_uncertainty_and_reviewers_answer_over_rest(
    client, redis_client
):
    shop = await tenant_headers(redis_client, "shop")
    for x in (0.7, 2.5, 1.2):
        await complete(client, shop, f"Where is order {x}? entropy={x}")
    chat = await client.post(
        "/v1/chat/completions",
        headers=shop,
        json={"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi entropy=1.9"}]},
    )
    assert chat.status_code == 200, chat.text
    await wait_queued(client, shop, 4)

    leases = []
    for _ in range(4):
        reply = await client.get("/feedback/next", params={"reviewer": "rita"}, headers=shop)
        assert reply.status_code == 200, reply.text
        leases.append(reply.json())
    assert [lease["item"]["scores"]["entropy"] for lease in leases] == pytest.approx(
        [2.5, 1.9, 1.2, 0.7]
    )
    assert [lease["item"]["priority"] for lease in leases] == pytest.approx([2.5, 1.9, 1.2, 0.7])
    first, chat_item = leases[0]["item"], leases[1]["item"]
    assert first["prompt"] == "Where is order 2.5? entropy=2.5"
    assert first["output"] == "echo:Where is order 2.5? entropy=2.5"
    assert first["adapter"] == {"name": "support", "version": 3}
    assert chat_item["prompt"] == "user: Hi entropy=1.9"
    assert chat_item["adapter"]["name"] == BASE_MODEL  # served by the base model
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
    p25, p12 = first["prompt"], leases[2]["item"]["prompt"]
    assert exported["sft"] == [
        {"prompt": p25, "completion": first["output"]},
        {"prompt": p12, "completion": "Your order ships today."},
    ]
    assert exported["dpo"] == [
        {
            "prompt": p12,
            "chosen": "Your order ships today.",
            "rejected": leases[2]["item"]["output"],
        }
    ]
    assert [(r["prompt"], r["label"]) for r in exported["kto"]] == [
        (p25, True),
        (chat_item["prompt"], False),
        (p12, True),
        (p12, False),
        (leases[3]["item"]["prompt"], False),
    ]
    only_support = await client.get(
        "/feedback/export", params={"format": "kto", "adapter": BASE_MODEL}, headers=shop
    )
    assert [json.loads(x)["prompt"] for x in only_support.text.splitlines()] == [
        chat_item["prompt"]
    ]
    future = await client.get(
        "/feedback/export", params={"format": "sft", "since": "2100-01-01T00:00:00Z"}, headers=shop
    )
    assert future.status_code == 200 and future.text == ""
    stats = (await client.get("/feedback/stats", headers=shop)).json()
    assert stats["closed"] == 4
    assert stats["feedback"] == {"rating": 2, "thumbs": 1, "corrected_text": 1}


async def test_select_over_rest_and_tenant_isolation(client, redis_client):
    shop = await tenant_headers(redis_client, "shop")
    bank = await tenant_headers(redis_client, "bank")
    for x in (0.3, 1.4, 0.9):
        await complete(client, shop, f"Refund for item {x}? entropy={x}")
    await wait_queued(client, shop, 3)
    reply = await client.post(
        "/active-learning/select",
        headers=shop,
        json={"method": "nll", "batch_size": 2, "dry_run": True},
    )
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert got["method"] == "nll" and got["pool_size"] == 3
    assert [i["scores"]["nll"] for i in got["items"]] == pytest.approx([0.7, 0.45])
    for bad, reason in (
        ({"method": "vibes"}, "UNKNOWN_METHOD"),
        ({"strategy": "lucky"}, "UNKNOWN_STRATEGY"),
        ({"batch_size": 0}, "INVALID_BATCH_SIZE"),
        ({"batch_size": 4}, "BATCH_SIZE_EXCEEDS_POOL"),
    ):
        error = assert_error(
            await client.post("/active-learning/select", headers=shop, json=bad),
            400,
            "INVALID_ARGUMENT",
        )
        assert error["details"][0]["reason"] == reason
    # The bank sees nothing of the shop's.
    assert (await client.get("/feedback/next", params={"reviewer": "b"}, headers=bank)).json() == {
        "item": None
    }
    error = assert_error(
        await client.post("/active-learning/select", headers=bank, json={"batch_size": 1}),
        400,
        "INVALID_ARGUMENT",
    )
    assert error["details"][0]["metadata"]["pool_size"] == "0"
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
    headers = await tenant_headers(redis_client, "shop")
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as bare:
        reply = await bare.get("/feedback/next", params={"reviewer": "x"}, headers=headers)
    assert (
        assert_error(reply, 503, "UNAVAILABLE")["details"][0]["reason"] == "ACTIVELEARNING_DISABLED"
    )
