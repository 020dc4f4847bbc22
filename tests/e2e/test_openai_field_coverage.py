"""Every field of OpenAI's request schemas, as the installed `openai` package defines them,
sent to the running gateway with a value that is not its default: each is honoured (200)
or refused with a 400 that names it, never silently ignored.

What the gateway honours is read from its request models (their declared fields), the one
place it is written; a 200 for any other field is a silent ignore. The only data kept here
is a sample value per field: a field the openai package adds without one fails the test
until one is written."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.openai_request_fields import ENDPOINTS, honoured, openai_fields

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADAPTER = "bank-support"
FUNCTION = {"name": "lookup", "parameters": {"type": "object", "properties": {}}}
# A value per field, as a client would send it; never the field's default (a default is
# honoured by doing nothing).
SAMPLES: dict[str, object] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "best_of": 2,
    "dimensions": 8,
    "echo": True,
    "encoding_format": "base64",
    "frequency_penalty": 0.5,
    "function_call": "auto",
    "functions": [FUNCTION],
    "input": ["Customer: hello", "Customer: bye"],
    "logit_bias": {"42": 5},
    "logprobs": 2,
    "max_completion_tokens": 3,
    "max_tokens": 3,
    "messages": [{"role": "user", "content": "Where is my card?"}],
    "metadata": {"team": "support"},
    "modalities": ["text", "audio"],
    "model": ADAPTER,
    "moderation": {"enabled": True},
    "n": 2,
    "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "Your card"},
    "presence_penalty": 0.5,
    "prompt": ["Customer: I lost my card.\nAgent:", "Customer: hello\nAgent:"],
    "prompt_cache_key": "support-prompts",
    "prompt_cache_options": {"mode": "auto"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "response_format": {"type": "json_object"},
    "safety_identifier": "user-17",
    "seed": 7,
    "service_tier": "flex",
    "stop": ["\n", "Customer:"],
    "store": True,
    "stream": True,
    "stream_options": {"include_usage": True},
    "suffix": " Thank you.",
    "temperature": 0.5,
    "tool_choice": "required",
    "tools": [{"type": "function", "function": FUNCTION}],
    "top_logprobs": 2,
    "top_p": 0.5,
    "user": "user-17",
    "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
}
CHAT_SAMPLES = {"logprobs": True}  # a boolean in chat, a count in completions


BASES: dict[str, dict[str, object]] = {
    "/v1/completions": {
        "model": ADAPTER,
        "prompt": "Customer: I lost my card.\nAgent:",
        "max_tokens": 3,
    },
    "/v1/chat/completions": {"model": ADAPTER, "messages": SAMPLES["messages"], "max_tokens": 3},
    "/v1/embeddings": {"model": ADAPTER, "input": "Customer: hello"},
}
CASES = [(path, field) for path in ENDPOINTS for field in openai_fields(path)]


@pytest.mark.parametrize(("path", "field"), CASES, ids=[f"{p}:{f}" for p, f in CASES])
def test_each_openai_field_is_honoured_or_refused_by_name(stack, path, field):
    samples = SAMPLES | (CHAT_SAMPLES if path == "/v1/chat/completions" else {})
    assert field in samples, f"add a sample value for {field!r} (new in the openai package)"
    body = BASES[path] | {field: samples[field]}
    headers = {"Authorization": f"Bearer {stack.keys['BANK_KEY']}"}
    response = httpx.post(f"{stack.url}{path}", json=body, headers=headers, timeout=60)
    if response.status_code == 200:
        assert field in honoured(path), f"{field} was accepted but the gateway ignores it"
        return
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert re.search(rf"\b{re.escape(field)}\b", message), message
