"""The official `openai` client, unchanged, against the gateway served by uvicorn."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import openai
import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.common.channels import open_channel
from services.common.redis import connect
from tests.unit.gateway.fake_inference import (
    BASE_MODEL,
    FakeInference,
    FakeInferenceServer,
    NewTenant,
    adapter_info,
    gateway_settings,
)


@contextmanager
def serve_gateway(settings: GatewaySettings, redis_url: str) -> Iterator[str]:
    """Runs the gateway in a thread with its own event loop (the grpc and Redis clients
    belong to the loop that made them); yields its base URL."""
    servers: list[uvicorn.Server] = []
    closed = threading.Event()

    async def serve() -> None:
        resources = AsyncExitStack()
        resources.callback(closed.set)
        redis = connect(redis_url)
        resources.push_async_callback(redis.aclose)
        channel = await resources.enter_async_context(open_channel(settings.inference_addr))
        app = create_app(settings, redis=redis, inference_channel=channel, resources=resources)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        servers.append(uvicorn.Server(config))
        await servers[0].serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (servers and servers[0].started):
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.01)
    server = servers[0]
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert closed.is_set(), "the app's lifespan did not release its resources"


async def test_openai_client_parses_every_response(
    inference: FakeInferenceServer, fake: FakeInference, test_redis_url: str, new_tenant: NewTenant
) -> None:
    fake.adapters += [adapter_info("bank", "fraud"), adapter_info("", "summarize", shared=True)]
    api_key = (await new_tenant("bank"))["Authorization"].removeprefix("Bearer ")

    with serve_gateway(gateway_settings(inference.addr), test_redis_url) as base_url:

        def use_the_client() -> dict[str, object]:
            client = openai.OpenAI(api_key=api_key, base_url=f"{base_url}/v1", max_retries=0)
            forged = openai.OpenAI(api_key="lpx_forged", base_url=f"{base_url}/v1", max_retries=0)
            got: dict[str, object] = {
                "completion": client.completions.create(model="fraud", prompt="Hi", max_tokens=4),
                "chat": client.chat.completions.create(
                    model=BASE_MODEL, messages=[{"role": "user", "content": "Hey"}], max_tokens=8
                ),
                "models": [m.id for m in client.models.list()],
            }
            try:
                client.completions.create(model="missing", prompt="x")
            except openai.NotFoundError as err:
                got["not_found"] = err
            try:
                forged.models.list()
            except openai.AuthenticationError as err:
                got["unauthenticated"] = err
            return got

        got = await asyncio.to_thread(use_the_client)

    completion = got["completion"]
    assert isinstance(completion, openai.types.Completion)
    assert completion.choices[0].text == "echo:Hi"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.total_tokens == 11
    assert completion.model == "fraud"

    chat = got["chat"]
    assert isinstance(chat, openai.types.chat.ChatCompletion)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "echo:Hey"
    assert chat.choices[0].finish_reason == "stop"

    assert got["models"] == [BASE_MODEL, "fraud", "summarize"]

    not_found = got["not_found"]
    assert isinstance(not_found, openai.NotFoundError)
    assert not_found.status_code == 404
    assert "adapter 'missing' not found" in str(not_found)
    assert isinstance(got["unauthenticated"], openai.AuthenticationError)

    assert [r.tenant for r in fake.requests["Generate"]] == ["bank", "bank", "bank"]
