"""What the gateway asks the inference service for, per response_format and tool_choice:
the JSON Schema it forwards (the schemas are built here by hand from OpenAI's definitions,
then compared), or none for free text; and the requests it refuses before any call."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.unit.gateway.fake_inference import BASE_MODEL, FakeInference, NewTenant, assert_error

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": PARAMS}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters at all
NO_PARAMETERS = {"type": "object", "properties": {}}


def call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


@pytest.fixture
async def bank(new_tenant: NewTenant) -> dict[str, str]:
    return await new_tenant("bank")


@pytest.mark.parametrize(
    ("extra", "schema"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"tools": [WEATHER], "tool_choice": "none"}, None),
        ({"response_format": {"type": "json_object"}}, ""),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "w", "schema": PARAMS},
                }
            },
            PARAMS,
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w"}}}, ""),
        (
            {
                "tools": [WEATHER, PING],
                "tool_choice": {"type": "function", "function": {"name": "weather"}},
            },
            PARAMS,
        ),
        (
            {
                "tools": [WEATHER, PING],
                "tool_choice": {"type": "function", "function": {"name": "ping"}},
            },
            NO_PARAMETERS,
        ),
        (
            {"tools": [WEATHER, PING], "tool_choice": "required"},
            {
                "type": "array",
                "items": {
                    "anyOf": [call_schema("weather", PARAMS), call_schema("ping", NO_PARAMETERS)]
                },
                "minItems": 1,
            },
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
            {
                "type": "array",
                "items": {"anyOf": [call_schema("weather", PARAMS)]},
                "minItems": 1,
                "maxItems": 1,
            },
        ),
    ],
)
async def test_the_schema_forwarded_to_inference(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference, extra, schema
) -> None:
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}]} | extra
    response = await client.post("/v1/chat/completions", json=body, headers=bank)
    assert response.status_code == 200, response.text
    (request,) = fake.requests["Generate"]
    if schema is None:
        assert not request.HasField("structured_output")
    elif schema == "":
        assert request.structured_output.json_schema == ""
        assert request.HasField("structured_output")
    else:
        assert json.loads(request.structured_output.json_schema) == schema


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"tools": [WEATHER]}, "TOOL_CHOICE_UNSUPPORTED"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "TOOL_CHOICE_UNSUPPORTED"),
        ({"tool_choice": "required"}, "TOOL_CHOICE_WITHOUT_TOOLS"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "UNKNOWN_TOOL",
        ),
        ({"response_format": {"type": "json_schema"}}, "INVALID_SCHEMA"),
        ({"response_format": {"type": "xml"}}, "INVALID_ARGUMENT"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "INVALID_ARGUMENT"),
    ],
)
async def test_refused_before_any_generation(
    client: httpx.AsyncClient, bank: dict[str, str], fake: FakeInference, extra, reason
) -> None:
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}]} | extra
    response = await client.post("/v1/chat/completions", json=body, headers=bank)
    error = assert_error(response, 400, "INVALID_ARGUMENT")
    assert error["details"][0]["reason"] == reason
    assert not fake.requests["Generate"]
