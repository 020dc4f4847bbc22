"""vLLM's own routes against the running stack, as a user migrating from vLLM calls them
(httpx), with the official openai client for the completions that follow."""

from __future__ import annotations

import json
import shutil
import uuid

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL_DIR = InferenceSettings().model_dir
PROMPT = "Customer: I lost my card yesterday.\nAgent:"


def client(stack, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys[f"{tenant.upper()}_KEY"])


def key(stack, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.keys[f'{tenant.upper()}_KEY']}"}


def admin_for(stack, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.admin_key}", "X-Loraplex-Tenant": tenant}


def post(stack, path: str, body: dict, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, headers=headers, timeout=60)


def greedy(tenant_client: openai.OpenAI, model: str) -> str:
    reply = tenant_client.completions.create(
        model=model, prompt=PROMPT, max_tokens=16, temperature=0
    )
    return reply.choices[0].text


def cached(stack, name: str) -> bool:
    stats = httpx.get(f"{stack.url}/admin/cache", headers=admin_for(stack, "bank")).json()
    return any(a["name"] == name for tier in stats["tiers"] for a in tier.get("adapters", []))


def test_load_serves_the_adapter_to_its_tenant_and_unload_evicts_it(stack, lora_load_dir):
    name = f"vllm-{uuid.uuid4().hex[:8]}"
    shutil.copytree(DEMO_ADAPTERS / "bank", lora_load_dir / name)
    loaded = post(
        stack,
        "/v1/load_lora_adapter",
        {"lora_name": name, "lora_path": name},
        admin_for(stack, "bank"),
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["adapter"]["version"] == 1
    bank = client(stack, "bank")
    assert name in {m.id for m in bank.models.list()}
    # The same weights as the demo adapter registered by upload: the same greedy text.
    assert greedy(bank, name) == greedy(bank, "bank-support")
    with pytest.raises(openai.NotFoundError):
        greedy(client(stack, "retailer"), name)
    assert cached(stack, name)

    unloaded = post(stack, "/v1/unload_lora_adapter", {"lora_name": name}, admin_for(stack, "bank"))
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["was_loaded"] is True
    assert not cached(stack, name)
    # Still registered: the next request loads it again (versions are kept for rollback).
    assert greedy(bank, name) == greedy(bank, "bank-support")

    again = post(
        stack,
        "/v1/load_lora_adapter",
        {"lora_name": name, "lora_path": str(lora_load_dir / name)},
        admin_for(stack, "bank"),
    )
    assert again.status_code == 200 and again.json()["adapter"]["version"] == 2


def test_load_and_unload_refusals(stack, lora_load_dir):
    bank_admin = admin_for(stack, "bank")
    outside = post(
        stack, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../"}, bank_admin
    )
    assert outside.status_code == 403
    assert outside.json()["error"]["details"][0]["reason"] == "LORA_PATH_OUTSIDE_DIR"
    tenant_key = post(
        stack, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "x"}, key(stack, "bank")
    )
    assert tenant_key.status_code == 403
    unknown = post(stack, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, bank_admin)
    assert unknown.status_code == 404
    other = post(stack, "/v1/unload_lora_adapter", {"lora_name": "retailer-support"}, bank_admin)
    assert other.status_code == 404  # another tenant's adapter is as good as missing


def test_tokenize_and_detokenize_use_the_base_models_tokenizer(stack):
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    context = json.loads((MODEL_DIR / "config.json").read_text())["max_position_embeddings"]
    body = {"model": "bank-support", "prompt": PROMPT, "return_token_strs": True}
    reply = post(stack, "/tokenize", body, key(stack, "bank"))
    assert reply.status_code == 200, reply.text
    expected = tokenizer(PROMPT).input_ids
    assert reply.json() == {
        "count": len(expected),
        "max_model_len": context,
        "tokens": expected,
        "token_strs": tokenizer.convert_ids_to_tokens(expected),
    }
    back = post(
        stack, "/detokenize", {"model": "bank-support", "tokens": expected}, key(stack, "bank")
    )
    assert back.json() == {"prompt": PROMPT}

    messages = [{"role": "user", "content": "How do I reset my PIN?"}]
    counted = post(
        stack, "/tokenize", {"model": "bank-support", "messages": messages}, key(stack, "bank")
    )
    chat = client(stack, "bank").chat.completions.create(
        model="bank-support", messages=messages, max_tokens=2
    )
    assert counted.json()["count"] == chat.usage.prompt_tokens
    assert counted.json()["token_strs"] is None

    for path, payload in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        foreign = post(stack, path, {"model": "retailer-support", **payload}, key(stack, "bank"))
        assert foreign.status_code == 404, foreign.text
