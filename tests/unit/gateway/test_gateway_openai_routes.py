"""The OpenAI-compatible routes, driven over HTTP against the fake inference service."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from services.common.errors import Unavailable
from tests.unit.gateway.fake_inference import (
    BASE_MODEL,
    MAX_NEW_TOKENS_LIMIT,
    FakeInference,
    NewTenant,
    adapter_info,
    assert_error,
)


@pytest.fixture
async def bank(new_tenant: NewTenant, fake: FakeInference) -> dict[str, str]:
    fake.adapters.append(adapter_info("bank", "fraud"))
    return await new_tenant("bank")


def completion(**overrides: Any) -> dict[str, Any]:
    return {"model": BASE_MODEL, "prompt": "Hello"} | overrides


# --- authentication ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_missing_key_is_401(
    client: httpx.AsyncClient, fake: FakeInference, path: str
) -> None:
    response = await client.post(path, json=completion())
    error = assert_error(response, 401, "UNAUTHENTICATED")
    assert error["details"][0]["reason"] == "API_KEY_MISSING"
    assert response.headers["www-authenticate"] == "Bearer"
    assert not fake.requests["Generate"]


async def test_invalid_key_is_401(client: httpx.AsyncClient, bank: dict[str, str]) -> None:
    response = await client.get("/v1/models", headers={"Authorization": "Bearer lpx_forged"})
    error = assert_error(response, 401, "UNAUTHENTICATED")
    assert error["details"][0]["reason"] == "API_KEY_INVALID"


async def test_admin_key_is_not_a_tenant_key(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    # It acts for a tenant only when X-Loraplex-Tenant names one (test_gateway_console_routes).
    error = assert_error(await client.get("/v1/models", headers=admin), 400, "INVALID_ARGUMENT")
    assert error["details"][0]["reason"] == "TENANT_REQUIRED"


async def test_each_key_acts_for_its_own_tenant_only(
    client: httpx.AsyncClient, fake: FakeInference, new_tenant: NewTenant
) -> None:
    fake.adapters.append(adapter_info("bank", "fraud"))
    bank = await new_tenant("bank")
    shop = await new_tenant("shop")

    ok = await client.post("/v1/completions", json=completion(model="fraud"), headers=bank)
    assert ok.status_code == 200, ok.text
    # shop names bank's adapter: the gateway asks as shop, and the service cannot find it.
    hidden = await client.post("/v1/completions", json=completion(model="fraud"), headers=shop)
    assert_error(hidden, 404, "NOT_FOUND")
    assert [r.tenant for r in fake.requests["Generate"]] == ["bank", "shop"]


# --- request validation -----------------------------------------------------------------


async def test_malformed_json_is_400(client: httpx.AsyncClient, bank: dict[str, str]) -> None:
    response = await client.post(
        "/v1/completions",
        content=b'{"model": "tiny-base", "prompt": ',
        headers=bank | {"Content-Type": "application/json"},
    )
    error = assert_error(response, 400, "INVALID_ARGUMENT")
    assert "not valid JSON" in error["message"]


async def test_missing_fields_are_named(client: httpx.AsyncClient, bank: dict[str, str]) -> None:
    response = await client.post("/v1/completions", json={"prompt": "x"}, headers=bank)
    error = assert_error(response, 400, "INVALID_ARGUMENT")
    assert error["message"].startswith("model:")
    violations = next(d for d in error["details"] if d["@type"].endswith("BadRequest"))
    assert violations["fieldViolations"][0]["field"] == "model"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"n": 0}, "n:"),
        ({"n": 2, "best_of": 1}, "best_of (1) must be at least n (2)"),
        ({"best_of": 2, "stream": True}, "best_of above n cannot be streamed"),
        ({"stream_options": {"include_usage": "sometimes"}}, "include_usage"),
        ({"logprobs": 6}, "logprobs:"),
        ({"logprobs": -1}, "logprobs:"),
        ({"prompt": []}, "prompt must be"),
        ({"prompt": ["a", 1]}, "prompt must be"),
        ({"prompt": [[1, 2], []]}, "prompt must be"),
        ({"prompt": [1, -2]}, "prompt must be"),
        ({"prompt": [True]}, "prompt must be"),
        ({"seed": -1}, "seed"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "0 only with echo"),
        ({"max_tokens": -5}, "max_tokens"),
    ],
)
async def test_unsupported_or_malformed_completion_options_are_400(
    client: httpx.AsyncClient,
    bank: dict[str, str],
    fake: FakeInference,
    overrides: dict[str, Any],
    words: str,
) -> None:
    response = await client.post("/v1/completions", json=completion(**overrides), headers=bank)
    error = assert_error(response, 400, "INVALID_ARGUMENT")
    assert words in error["message"]
    assert not fake.requests["Generate"]


async def test_options_left_at_their_defaults_are_accepted(
    client: httpx.AsyncClient, bank: dict[str, str]
) -> None:
    body = completion(echo=False, logprobs=None, presence_penalty=0, tools=[], some_option="")
    response = await client.post("/v1/completions", json=body, headers=bank)
    assert response.status_code == 200, response.text


async def test_unknown_options_that_are_set_are_refused_by_name(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    body = completion(top_k=5, some_future_option="x")  # vLLM's top_k would change the output
    response = await client.post("/v1/completions", json=body, headers=bank)
    error = assert_error(response, 400, "INVALID_ARGUMENT")
    assert "some_future_option" in error["message"] and "top_k" in error["message"]
    assert not fake.requests["Generate"]


# --- completions ------------------------------------------------------------------------


async def test_completion_shape_and_what_inference_receives(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    body = completion(
        model="fraud@2",
        prompt=["Is this fraud?"],
        max_tokens=32,
        temperature=0,
        top_p=0.5,
        seed=7,
        stop="\n",
        user="u-1",
    )
    response = await client.post("/v1/completions", json=body, headers=bank)
    assert response.status_code == 200, response.text
    got = response.json()

    assert got["id"].startswith("cmpl-")
    assert got["object"] == "text_completion"
    assert isinstance(got["created"], int)
    assert got["model"] == "fraud@2"
    assert got["choices"] == [
        {"text": "echo:Is this fraud?", "index": 0, "finish_reason": "stop", "logprobs": None}
    ]
    assert got["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert got["loraplex"]["adapter"] == {"name": "fraud", "version": 2}
    assert got["loraplex"]["uncertainty"]["min_token_prob"] == 0.125
    assert got["loraplex"]["timing"]["total_seconds"] == 1.5

    (sent,) = fake.requests["Generate"]
    assert sent.tenant == "bank"
    assert (sent.adapter.name, sent.adapter.version) == ("fraud", 2)
    assert sent.prompt == "Is this fraud?" and not sent.messages
    assert sent.params.max_new_tokens == 32
    assert sent.params.temperature == 0 and sent.params.HasField("temperature")
    assert sent.params.top_p == 0.5
    assert sent.params.seed == 7
    assert list(sent.params.stop) == ["\n"]
    assert sent.request_id == got["id"]


async def test_completion_defaults(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    response = await client.post("/v1/completions", json=completion(), headers=bank)
    assert response.status_code == 200, response.text
    (sent,) = fake.requests["Generate"]
    assert (sent.adapter.name, sent.adapter.version) == ("", 0)  # base model: no adapter
    assert sent.params.max_new_tokens == 16
    assert not sent.params.HasField("temperature") and not sent.params.HasField("seed")
    assert response.json()["loraplex"]["adapter"] == {"name": "", "version": 0}


async def test_length_finish_reason(client: httpx.AsyncClient, bank: dict[str, str]) -> None:
    response = await client.post("/v1/completions", json=completion(max_tokens=3), headers=bank)
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def test_not_found_from_inference_is_404_with_reason(
    client: httpx.AsyncClient, bank: dict[str, str]
) -> None:
    response = await client.post("/v1/completions", json=completion(model="nope"), headers=bank)
    error = assert_error(response, 404, "NOT_FOUND")
    assert error["message"] == "adapter 'nope' not found"
    assert error["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ADAPTER_NOT_FOUND",
            "domain": "loraplex.dev",
            "metadata": {"adapter": "nope"},
        }
    ]


async def test_invalid_argument_from_inference_is_400_with_details(
    client: httpx.AsyncClient, bank: dict[str, str]
) -> None:
    body = completion(max_tokens=MAX_NEW_TOKENS_LIMIT + 1)
    error = assert_error(
        await client.post("/v1/completions", json=body, headers=bank), 400, "INVALID_ARGUMENT"
    )
    assert error["details"][0]["reason"] == "MAX_NEW_TOKENS_TOO_LARGE"
    assert error["details"][0]["metadata"] == {"limit": str(MAX_NEW_TOKENS_LIMIT)}


async def test_version_out_of_range_is_400(client: httpx.AsyncClient, bank: dict[str, str]) -> None:
    body = completion(model="fraud@99999999999")
    error = assert_error(
        await client.post("/v1/completions", json=body, headers=bank), 400, "INVALID_ARGUMENT"
    )
    assert error["details"][0]["reason"] == "INVALID_ADAPTER_VERSION"


# --- chat -------------------------------------------------------------------------------


async def test_chat_completion_shape_and_messages(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    body = {
        "model": "fraud",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
            },
        ],
        "max_completion_tokens": 20,
    }
    response = await client.post("/v1/chat/completions", json=body, headers=bank)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["id"].startswith("chatcmpl-")
    assert got["object"] == "chat.completion"
    assert got["model"] == "fraud"
    assert got["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo:Hi there"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert got["loraplex"]["adapter"] == {"name": "fraud", "version": 3}

    (sent,) = fake.requests["Generate"]
    assert [(m.role, m.content) for m in sent.messages] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    assert sent.prompt == ""
    assert sent.params.max_new_tokens == 20


async def test_chat_without_max_tokens_asks_for_as_many_as_fit(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    response = await client.post("/v1/chat/completions", json=body, headers=bank)
    assert response.status_code == 200, response.text
    assert fake.requests["Generate"][0].params.max_new_tokens == 0  # 0: as many as fit


@pytest.mark.parametrize(
    "body",
    [
        {"model": BASE_MODEL, "messages": []},
        {"model": BASE_MODEL, "messages": [{"role": "tool", "content": "x"}]},
        {"model": BASE_MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"model": BASE_MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0},
        {"model": BASE_MODEL, "messages": [{"role": "user", "content": "x"}], "best_of": 2},
        {"model": BASE_MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        {
            "model": BASE_MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "logprobs": True,
            "top_logprobs": 21,
        },
        {"model": BASE_MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
    ],
)
async def test_invalid_chat_requests_are_400(
    client: httpx.AsyncClient,
    bank: dict[str, str],
    fake: FakeInference,
    body: dict[str, Any],
) -> None:
    response = await client.post("/v1/chat/completions", json=body, headers=bank)
    assert_error(response, 400, "INVALID_ARGUMENT")
    assert not fake.requests["Generate"]


# --- models -----------------------------------------------------------------------------


async def test_models_lists_base_own_and_shared_adapters_across_pages(
    client: httpx.AsyncClient, fake: FakeInference, new_tenant: NewTenant
) -> None:
    fake.adapters += [
        adapter_info("bank", "fraud"),
        adapter_info("bank", "kyc", version=4),
        adapter_info("shop", "upsell"),  # another tenant's: must not appear
        adapter_info("", "summarize", shared=True),
    ]
    bank = await new_tenant("bank")
    response = await client.get("/v1/models", headers=bank)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in got["data"]] == [
        (BASE_MODEL, "platform"),
        ("fraud", "bank"),
        ("kyc", "bank"),
        ("summarize", "platform"),
    ]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in got["data"])
    assert got["data"][2]["created"] == 1_700_000_004
    assert len(fake.requests["ListAdapters"]) == 2  # followed next_page_token
    assert {r.tenant for r in fake.requests["ListAdapters"]} == {"bank"}


async def test_model_info_is_asked_once(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    for _ in range(3):
        assert (await client.post("/v1/completions", json=completion(), headers=bank)).is_success
    assert len(fake.requests["GetModelInfo"]) == 1


async def test_unreachable_inference_is_503(
    client: httpx.AsyncClient, bank: dict[str, str], inference: Any
) -> None:
    await inference.server.grpc.stop(None)
    response = await client.post("/v1/completions", json=completion(), headers=bank)
    error = assert_error(response, 503, "UNAVAILABLE")
    assert inference.addr not in error["message"]


async def test_form_encoded_body_is_400_saying_json_is_expected(
    client: httpx.AsyncClient, bank: dict[str, str]
) -> None:
    # What `curl -d '{...}'` sends when the Content-Type header is forgotten.
    response = await client.post(
        "/v1/completions",
        content=b'{"model": "tiny-base", "prompt": "x"}',
        headers=bank | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    error = assert_error(response, 400, "INVALID_ARGUMENT")
    assert "application/json" in error["message"]


# --- streaming (server-sent events) -----------------------------------------------------


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded ("[DONE]" kept as a string)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


async def test_streamed_completion_is_openai_chunks_then_done(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    body = completion(model="fraud", prompt="Hi there", stream=True)
    body["stream_options"] = {"include_usage": True}
    response = await client.post("/v1/completions", json=body, headers=bank)
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(choice["text"] for c in chunks for choice in c["choices"])
    assert text == "echo:Hi there"
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-2]["loraplex"]["adapter"] == {"name": "fraud", "version": 3}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert [r.tenant for r in fake.requests["GenerateStream"]] == ["bank"]


async def test_streamed_chat_names_the_role_first(
    client: httpx.AsyncClient, bank: dict[str, str]
) -> None:
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    response = await client.post("/v1/chat/completions", json=body | {"stream": True}, headers=bank)
    chunks = sse_events(response)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == "echo:Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the fake: max_tokens 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[-1]  # not asked for


async def test_stream_refused_before_it_starts_gets_its_http_status(
    client: httpx.AsyncClient, bank: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/completions", json=completion(model="nope", stream=True), headers=bank
    )
    assert_error(response, 404, "NOT_FOUND")


async def test_failure_mid_stream_ends_with_an_error_event(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    fake.fail["GenerateStream.mid"] = Unavailable("model failed", reason="MODEL_ERROR")
    response = await client.post(
        "/v1/completions", json=completion(prompt="Hi there", stream=True), headers=bank
    )
    assert response.status_code == 200  # the status line went out with the first chunk
    events = sse_events(response)
    assert events[0]["choices"][0]["text"] == "echo"  # the first third of "echo:Hi there"
    assert events[-1]["error"]["code"] == "UNAVAILABLE"
    assert "[DONE]" not in events


# --- composition ------------------------------------------------------------------------


async def test_composition_is_sent_to_inference_as_asked(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference
) -> None:
    mix = {
        "adapters": [{"adapter": "fraud@2", "weight": 0.7}, {"adapter": "loans", "weight": 0.3}],
        "method": "dare_ties",
        "density": 0.5,
        "seed": 3,
    }
    response = await client.post("/v1/completions", json=completion(composition=mix), headers=bank)
    assert response.status_code == 200, response.text
    sent = fake.requests["Generate"][-1]
    assert not sent.adapter.name
    parts = [(p.adapter.name, p.adapter.version, p.weight) for p in sent.composition.parts]
    assert parts == [("fraud", 2, 0.7), ("loans", 0, 0.3)]
    assert (sent.composition.method, sent.composition.density, sent.composition.seed) == (
        "dare_ties",
        0.5,
        3,
    )
    assert not sent.composition.HasField("svd_rank")


@pytest.mark.parametrize(
    ("overrides", "status", "words"),
    [
        ({"model": "fraud"}, 400, "must be the base model"),
        ({"composition": {"adapters": []}}, 400, "adapters"),
        ({"composition": {"adapters": [{"adapter": "fraud"}], "method": "magic"}}, 400, "method"),
        ({"composition": {"adapters": [{"adapter": "fraud", "weight": "NaN"}]}}, 400, "weight"),
        ({"composition": {"adapters": [{"adapter": "fraud"}], "extra": 1}}, 400, "extra"),
    ],
)
async def test_bad_compositions_are_400(
    client: httpx.AsyncClient,
    bank: dict[str, str],
    fake: FakeInference,
    overrides: dict[str, Any],
    status: int,
    words: str,
) -> None:
    body = completion(composition={"adapters": [{"adapter": "fraud"}]}) | overrides
    response = await client.post("/v1/completions", json=body, headers=bank)
    error = assert_error(response, status, "INVALID_ARGUMENT")
    assert words in error["message"]
    assert not fake.requests["Generate"]
