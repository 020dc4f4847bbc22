"""Structured outputs and tool calls with the official openai client against the running
stack and its default model (loraplex-tiny, which has never seen JSON): response_format
json_object and json_schema, the client's Pydantic parse helper, tools with a named
tool_choice and "required", streaming, and the refusals. Outputs are checked with
jsonschema and Pydantic, independent validators."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

QUESTIONS = [
    "Where is my order 4821?",
    "I lost my card yesterday.",
    "My flight was delayed, what are my options?",
    "Can I return these shoes?",
    "Please raise my credit limit.",
]


class Ticket(BaseModel):
    category: Literal["order", "refund", "card", "flight"]
    priority: int = Field(ge=1, le=5)
    urgent: bool
    summary: str = Field(max_length=24)


class Answer(BaseModel):
    answer: str  # unbounded: the small model's never end by themselves


ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1000, "maximum": 9999},
        "status": {"enum": ["shipped", "delayed", "lost"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
        "gift": {"type": ["boolean", "null"]},
    },
    "required": ["order_id", "status", "items", "gift"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
REFUND = {
    "type": "function",
    "function": {
        "name": "refund_order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "integer", "minimum": 1, "maximum": 99999}},
            "required": ["order_id"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, REFUND)}


def client(stack, tenant: str = "bank") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys[f"{tenant.upper()}_KEY"])


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def reason(err: openai.APIStatusError) -> str:
    return err.response.json()["error"]["details"][0]["reason"]


def test_the_parse_helper_returns_a_valid_object_100_times_in_a_row(stack):
    bank = client(stack)

    def parse(i: int) -> Ticket | None:
        reply = bank.chat.completions.parse(
            model="loraplex-tiny" if i % 2 else "bank-support",
            messages=ask(f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})"),
            response_format=Ticket,
            seed=i,
            temperature=1.0,
        )
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.parsed

    with ThreadPoolExecutor(8) as pool:  # rows of the same batches
        tickets = list(pool.map(parse, range(100)))
    assert all(isinstance(t, Ticket) for t in tickets)
    # Seeds and prompts vary, and so do the objects: this is the model sampling, not a
    # canned answer.
    assert len({t.model_dump_json() for t in tickets}) > 50


def test_json_object_is_a_json_object_streamed_or_not(stack):
    bank = client(stack)
    request = {
        "model": "bank-support",
        "messages": ask("Describe my account as JSON."),
        "response_format": {"type": "json_object"},
        "seed": 3,
        "max_tokens": 40,
    }
    reply = bank.chat.completions.create(**request)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    chunks = list(bank.chat.completions.create(stream=True, **request))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_strict_output_validates(stack, seed):
    reply = client(stack, "retailer").chat.completions.create(
        model="retailer-support",
        messages=ask(QUESTIONS[seed]),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True},
        },
        seed=seed,
        temperature=1.0,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), ORDER_SCHEMA)
    assert reply.choices[0].finish_reason == "stop"


def test_a_budget_that_runs_out_closes_the_json_and_says_length(stack):
    # Free strings: the small model never ends one, so max_tokens does.
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "sources": {"type": "array"}},
        "required": ["answer", "sources"],
        "additionalProperties": False,
    }
    reply = client(stack).chat.completions.create(
        model="bank-support",
        messages=ask("Explain overdraft fees."),
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        max_tokens=30,
        seed=1,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens <= 30
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    # ... and the parse helper refuses it, as it refuses OpenAI's truncated replies.
    with pytest.raises(openai.LengthFinishReasonError):
        client(stack).chat.completions.parse(
            model="bank-support",
            messages=ask("Explain overdraft fees."),
            response_format=Answer,
            max_tokens=12,
            seed=1,
        )


def test_a_named_tool_choice_calls_that_function(stack):
    reply = client(stack).chat.completions.create(
        model="bank-support",
        messages=ask("What's the weather in Oslo?"),
        tools=[WEATHER, REFUND],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=5,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS["get_weather"])


@pytest.mark.parametrize("seed", range(3))
def test_required_tool_choice_calls_one_of_the_tools(stack, seed):
    reply = client(stack, "airline").chat.completions.create(
        model="airline-support",
        messages=ask(QUESTIONS[seed]),
        tools=[WEATHER, REFUND],
        tool_choice="required",
        parallel_tool_calls=False,
        seed=seed,
        temperature=1.0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls  # parallel_tool_calls=False: exactly one
    assert call.function.name in TOOLS
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name])


def test_tool_calls_stream_in_openai_shape(stack):
    bank = client(stack)
    for tool_choice in ({"type": "function", "function": {"name": "refund_order"}}, "required"):
        request = {
            "model": "bank-support",
            "messages": ask("Refund order 7."),
            "tools": [WEATHER, REFUND],
            "tool_choice": tool_choice,
            "parallel_tool_calls": False,  # one call: the small model would go on listing
            "seed": 2,
        }
        whole = bank.chat.completions.create(**request).choices[0].message.tool_calls
        chunks = [c for c in bank.chat.completions.create(stream=True, **request) if c.choices]
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert deltas[0].id and deltas[0].type == "function"
        calls: dict[int, dict[str, str]] = {}
        for d in deltas:  # what a client does: first delta names it, the rest add arguments
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
            (w.function.name, json.loads(w.function.arguments)) for w in whole
        ]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text(stack):
    reply = client(stack).chat.completions.create(
        model="bank-support",
        messages=ask("How do I reset my PIN?"),
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in {"stop", "length"}


@pytest.mark.parametrize(
    ("extra", "expected", "words"),
    [
        ({"tools": [WEATHER]}, "TOOL_CHOICE_UNSUPPORTED", "auto"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "TOOL_CHOICE_UNSUPPORTED", "auto"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "UNKNOWN_TOOL",
            "'x'",
        ),
        ({"tool_choice": "required"}, "TOOL_CHOICE_WITHOUT_TOOLS", "tools"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "bad",
                        "schema": {"type": "string", "pattern": "(?<=a)b"},
                    },
                }
            },
            "INVALID_SCHEMA",
            "lookbehind",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "t", "schema": {"type": "strin"}},
                }
            },
            "INVALID_SCHEMA",
            "strin",
        ),
    ],
)
def test_what_cannot_be_honoured_is_a_400_that_says_why(stack, extra, expected, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client(stack).chat.completions.create(
            model="bank-support", messages=ask("Hi"), max_tokens=4, **extra
        )
    assert reason(caught.value) == expected
    assert words.lower() in caught.value.response.json()["error"]["message"].lower()


def test_each_of_n_choices_follows_its_own_grammar(stack):
    bank = client(stack)
    schema_format = {"type": "json_schema", "json_schema": {"name": "o", "schema": ORDER_SCHEMA}}
    reply = bank.chat.completions.create(
        model="bank-support",
        messages=ask(QUESTIONS[0]),
        response_format=schema_format,
        n=3,
        seed=4,
        temperature=1.0,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), ORDER_SCHEMA)
    calls = bank.chat.completions.create(
        model="bank-support",
        messages=ask("Weather in Rome?"),
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        n=2,
        seed=4,
    )
    for choice in calls.choices:
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), TOOLS["get_weather"])
