"""Bad input at the edge is a 400 (or 408/413) with a reason, never a 500: text that is
not valid Unicode, integers that overflow their proto fields, dates out of range, huge
identifiers, slow bodies; and the OpenAPI document states the statuses really returned."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway.middleware import BodyLimitMiddleware
from tests.unit.gateway.fake_inference import BASE_MODEL, FakeInference, NewTenant, assert_error


@pytest.fixture
async def bank(new_tenant: NewTenant) -> dict[str, str]:
    return await new_tenant("bank")


async def post_json(client, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    """json.dumps writes a lone surrogate as the escape a client would send: "\\ud800"."""
    headers = headers | {"Content-Type": "application/json"}
    return await client.post("/v1/completions", headers=headers, content=json.dumps(body))


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "hi \ud800 there"},  # a lone high surrogate
        {"prompt": "\udc00"},  # a lone low one
        {"prompt": "hi", "user": "\ud83d"},
        {"prompt": "hi", "stop": ["\ud800"]},
        {"prompt": "hi", "\udfff": 1},  # in a key
    ],
)
async def test_lone_surrogates_are_400(client, bank, fake: FakeInference, fields) -> None:
    response = await post_json(client, bank, {"model": BASE_MODEL} | fields)
    assert_error(response, 400, "INVALID_ARGUMENT")
    assert not fake.requests["Generate"]


async def test_upper_case_escapes_are_caught_too(client, bank, fake: FakeInference) -> None:
    body = json.dumps({"model": BASE_MODEL, "prompt": "\ud800"}).replace("ud800", "uD800")
    headers = bank | {"Content-Type": "application/json"}
    response = await client.post("/v1/completions", headers=headers, content=body)
    assert_error(response, 400, "INVALID_ARGUMENT")


async def test_a_surrogate_pair_is_a_character_and_passes(client, bank, fake) -> None:
    response = await post_json(client, bank, {"model": BASE_MODEL, "prompt": "smile \U0001f600"})
    assert response.status_code == 200, response.text
    assert fake.requests["Generate"][-1].prompt == "smile \U0001f600"


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/active-learning/select", {"json": {"batch_size": 2**40}}),
        (
            "post",
            "/feedback",
            {"json": {"item_id": "i", "reviewer": "r", "lease_id": "l", "rating": 2**40}},
        ),
        ("get", "/analytics/top-performers?min_requests=99999999999", {}),
        ("get", "/feedback/export?since=9999-12-31T23:59:59-05:00", {}),
        ("get", "/feedback/export?until=0001-01-01T00:00:00%2B05:00", {}),
        ("post", "/feedback", {"json": {"item_id": "i" * 7000, "reviewer": "r", "lease_id": "l"}}),
        ("get", "/feedback/next?reviewer=" + "r" * 7000, {}),
        ("post", "/v1/completions", {"json": {"model": BASE_MODEL, "prompt": "x", "seed": -1}}),
        ("post", "/v1/completions", {"json": {"model": BASE_MODEL, "prompt": "x", "seed": 2**64}}),
    ],
)
async def test_out_of_range_values_are_400(client, bank, method, path, kwargs) -> None:
    response = await getattr(client, method)(path, headers=bank, **kwargs)
    assert_error(response, 400, "INVALID_ARGUMENT")


async def test_a_body_that_stops_arriving_is_408() -> None:
    async def app(scope, receive, send) -> None:  # reads the whole body, then answers
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": b"{", "more_body": True}]

    async def receive() -> dict:
        if chunks:
            return chunks.pop()
        await asyncio.sleep(3600)  # the client never sends the rest
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    from fastapi import FastAPI

    from gateway.errors import install_error_handlers  # the 408 body comes from the handler

    api = FastAPI()
    install_error_handlers(api)

    @api.post("/x")
    async def x(body: dict) -> dict:
        return body

    guarded = BodyLimitMiddleware(api, limit=1024, prefix_limits={}, read_timeout=0.2)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("gateway", 80),
        "headers": [(b"content-type", b"application/json")],
    }
    await asyncio.wait_for(guarded(scope, receive, send), timeout=10)
    assert sent[0]["status"] == 408


async def test_a_stream_outlasting_the_body_read_timeout_is_not_cut() -> None:
    """Once the body is in, a streaming response (SSE: job progress, tokens) waits on
    `receive` for the disconnect for as long as it streams: the body deadline must not apply."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    api = FastAPI()

    @api.get("/events")
    async def events() -> StreamingResponse:
        async def ticks():
            for i in range(4):
                await asyncio.sleep(0.2)
                yield f"tick {i}\n".encode()

        return StreamingResponse(ticks(), media_type="text/event-stream")

    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays connected
        raise AssertionError("unreachable")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    guarded = BodyLimitMiddleware(api, limit=1024, prefix_limits={}, read_timeout=0.1)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "path": "/events",
        "raw_path": b"/events",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("gateway", 80),
        "headers": [],
    }
    await asyncio.wait_for(guarded(scope, receive, send), timeout=10)
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert body == b"tick 0\ntick 1\ntick 2\ntick 3\n"


async def test_openapi_states_400_not_422_and_the_error_statuses(client) -> None:
    document = (await client.get("/openapi.json")).json()
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert operations
    for operation in operations:
        statuses = set(operation["responses"])
        assert "422" not in statuses
        assert {"400", "401", "429", "500", "503"} <= statuses
    assert "ErrorBody" in document["components"]["schemas"]
