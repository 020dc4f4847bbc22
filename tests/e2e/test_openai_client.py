"""A newcomer's first calls: the official openai client against the running local stack."""

from __future__ import annotations

import json
import signal

import httpx
import openai
import pytest

from tests.helpers import DEMO_ADAPTERS, adapter_files

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOMAIN_WORDS = {
    "retailer": {"order", "ship", "deliver", "return", "refund", "size", "package", "item"},
    "bank": {"card", "account", "transfer", "pin", "balance", "loan", "payment", "bank"},
    "airline": {"flight", "booking", "baggage", "bag", "seat", "check-in", "gate", "boarding"},
}
PROMPTS = {
    "retailer": "Customer: Where is my order 4821?\nAgent:",
    "bank": "Customer: I lost my card yesterday.\nAgent:",
    "airline": "Customer: My flight was delayed, what are my options?\nAgent:",
}


def client(stack, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys[f"{tenant.upper()}_KEY"])


@pytest.mark.parametrize("tenant", sorted(DOMAIN_WORDS))
def test_completion_with_demo_adapter_returns_domain_text(stack, tenant):
    reply = client(stack, tenant).completions.create(
        model=f"{tenant}-support", prompt=PROMPTS[tenant], max_tokens=32, temperature=0
    )
    text = reply.choices[0].text
    words = {w.strip(".,!?:;'\"").lower() for w in text.split()}
    assert words & DOMAIN_WORDS[tenant], text
    assert reply.usage.completion_tokens > 0
    assert reply.choices[0].finish_reason in {"stop", "length"}


def test_chat_completion(stack):
    reply = client(stack, "bank").chat.completions.create(
        model="bank-support",
        messages=[{"role": "user", "content": "How do I reset my PIN?"}],
        max_tokens=24,
        temperature=0,
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip()


def test_models_lists_only_the_callers_adapters(stack):
    ids = {m.id for m in client(stack, "airline").models.list()}
    assert "airline-support" in ids and "loraplex-tiny" in ids
    assert "bank-support" not in ids and "retailer-support" not in ids


def test_another_tenants_adapter_is_not_found(stack):
    with pytest.raises(openai.NotFoundError):
        client(stack, "airline").completions.create(
            model="bank-support", prompt="Customer: hi\nAgent:", max_tokens=4
        )


def test_bad_key_is_401(stack):
    bad = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="lpx_not_a_key")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 0},
        {"max_tokens": 1_000_000},
        {"temperature": -1},
        {"prompt": "word " * 5000},
    ],
)
def test_bad_parameters_are_400_with_an_error_body(stack, body):
    payload = {"model": "retailer-support", "prompt": "Customer: hi\nAgent:", **body}
    reply = httpx.post(
        f"{stack.url}/v1/completions",
        json=payload,
        headers={"Authorization": f"Bearer {stack.keys['RETAILER_KEY']}"},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT" and error["message"]


def test_malformed_json_is_400(stack):
    reply = httpx.post(
        f"{stack.url}/v1/completions",
        content=b'{"model": "retailer-support", "prompt": ',
        headers={
            "Authorization": f"Bearer {stack.keys['RETAILER_KEY']}",
            "Content-Type": "application/json",
        },
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_readyz_and_metrics(stack):
    assert httpx.get(f"{stack.url}/readyz").status_code == 200
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert "loraplex_http_requests_total" in metrics


def upload(stack, tenant: str, files: dict[str, bytes], **form) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/admin/tenants/{tenant}/adapters",
        headers={"Authorization": f"Bearer {stack.keys['LORAPLEX_ADMIN_KEY']}"},
        data=form,
        files=[("files", (name, content)) for name, content in files.items()],
        timeout=60,
    )


def test_admin_uploads_an_adapter_that_the_tenant_can_use_at_once(stack):
    files = adapter_files(DEMO_ADAPTERS / "airline")
    reply = upload(stack, "bank", files, name="travel-desk")
    assert reply.status_code == 201, reply.text
    assert reply.json()["version"] == 1
    completion = client(stack, "bank").completions.create(
        model="travel-desk", prompt=PROMPTS["airline"], max_tokens=8
    )
    assert completion.choices[0].text


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("pickle", "PICKLE_REFUSED"),
        ("sha256", "SHA256_MISMATCH"),
        ("targets", "TARGET_MODULES_NOT_FOUND"),
    ],
)
def test_bad_adapter_uploads_are_400_with_the_reason(stack, change, reason):
    files = adapter_files(DEMO_ADAPTERS / "retailer")
    form = {"name": f"bad-{change}"}
    if change == "pickle":
        files["adapter_model.bin"] = files.pop("adapter_model.safetensors")
    elif change == "sha256":
        form["sha256"] = "0" * 64
    else:
        config = json.loads(files["adapter_config.json"])
        config["target_modules"] = ["c_attn"]
        files["adapter_config.json"] = json.dumps(config).encode()
    reply = upload(stack, "retailer", files, **form)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["details"][0]["reason"] == reason


def test_stack_stops_cleanly_on_ctrl_c(stack):
    """Runs last in this module: Ctrl-C stops every process with status 0."""
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.url}/healthz", timeout=2)
