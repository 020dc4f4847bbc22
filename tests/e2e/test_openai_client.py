"""A newcomer's first calls: the official openai client against the running local stack."""

from __future__ import annotations

import json
import time

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


def test_streaming_with_the_openai_client_equals_the_whole_reply(stack):
    bank = client(stack, "bank")
    ask = {"model": "bank-support", "max_tokens": 24, "temperature": 0}
    messages = [{"role": "user", "content": "How do I reset my PIN?"}]
    whole = bank.chat.completions.create(messages=messages, **ask)
    chunks = list(
        bank.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **ask
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices]) > 2  # it came in pieces
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(
        c.choices[0].text
        for c in bank.completions.create(prompt=PROMPTS["bank"], stream=True, **ask)
    )
    assert text == bank.completions.create(prompt=PROMPTS["bank"], **ask).choices[0].text


def test_a_composition_of_halves_serves_like_the_whole_adapter(stack):
    retailer = client(stack, "retailer")
    ask = {"prompt": PROMPTS["retailer"], "max_tokens": 24, "temperature": 0}
    whole = retailer.completions.create(model="retailer-support", **ask)
    halves = [{"adapter": "retailer-support", "weight": 0.5}] * 2
    mixed = retailer.completions.create(
        model="loraplex-tiny", extra_body={"composition": {"adapters": halves}}, **ask
    )
    assert mixed.choices[0].text == whole.choices[0].text  # cat is exact: 0.5 + 0.5 = 1
    served = mixed.model_extra["loraplex"]
    assert served["adapter"]["name"].startswith("composed:")
    assert [a["name"] for a in served["composed_of"]] == ["retailer-support"] * 2


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
    assert 'adapter="retailer-support",code="OK"' in metrics  # per-adapter (bounded) series


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


def test_completions_show_up_in_analytics_with_exact_counts(stack):
    assert upload(
        stack, "airline", adapter_files(DEMO_ADAPTERS / "airline"), name="probe"
    ).is_success
    airline = client(stack, "airline")
    for _ in range(3):
        airline.completions.create(model="probe", prompt=PROMPTS["airline"], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        airline.completions.create(model="probe", prompt=PROMPTS["airline"], max_tokens=10**6)

    def metrics(tenant: str) -> dict:
        reply = httpx.get(
            f"{stack.url}/analytics/adapters/probe",
            headers={"Authorization": f"Bearer {stack.keys[f'{tenant.upper()}_KEY']}"},
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["metrics"]

    deadline = time.monotonic() + 15  # the gateway exports in the background, every second
    while metrics("airline")["requests"] < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = metrics("airline")
    assert (seen["requests"], seen["successes"], seen["errors"]) == (4, 3, 1)
    assert seen["errors_by_code"] == {"INVALID_ARGUMENT": 1}
    assert seen["completion_tokens"] > 0 and seen["latency_p50_seconds"] > 0
    assert metrics("bank")["requests"] == 0  # another tenant sees nothing of it

    top = httpx.get(
        f"{stack.url}/analytics/top-performers",
        params={"metric": "requests", "limit": 50},
        headers={"Authorization": f"Bearer {stack.keys['AIRLINE_KEY']}"},
    ).json()
    assert "probe" in [a["adapter"] for a in top["adapters"]]


def test_an_experiment_routes_users_to_sticky_variants(stack):
    bank = {"Authorization": f"Bearer {stack.keys['BANK_KEY']}"}
    assert upload(stack, "bank", adapter_files(DEMO_ADAPTERS / "bank"), name="bank-b").is_success
    definition = {
        "key": "support-v2",
        "variants": [
            {"name": "control", "traffic_weight": 0.5, "adapters": [{"name": "bank-support"}]},
            {"name": "treatment", "traffic_weight": 0.5, "adapters": [{"name": "bank-b"}]},
        ],
    }
    created = httpx.post(f"{stack.url}/ab-testing/experiments", json=definition, headers=bank)
    assert created.status_code == 201, created.text
    started = httpx.patch(
        f"{stack.url}/ab-testing/experiments/support-v2",
        json={"action": "EXPERIMENT_ACTION_START"},
        headers=bank,
    )
    assert started.status_code == 200, started.text

    served = {}
    for user in (f"user-{i}" for i in range(12)):
        reply = httpx.post(
            f"{stack.url}/v1/completions",
            json={"model": "experiment:support-v2", "user": user, "prompt": "Hi", "max_tokens": 2},
            headers=bank,
            timeout=60,
        ).json()
        routed = reply["loraplex"]["experiment"]
        assert routed["in_experiment"]
        adapter = {"control": "bank-support", "treatment": "bank-b"}[routed["variant"]]
        assert reply["loraplex"]["adapter"]["name"] == adapter
        served[user] = routed["variant"]
        assigned = httpx.post(
            f"{stack.url}/ab-testing/assign",
            json={"experiment": "support-v2", "unit_id": user},
            headers=bank,
        ).json()
        assert assigned["variant"]["name"] == routed["variant"]  # the same, every time
    assert set(served.values()) == {"control", "treatment"}

    results = httpx.get(f"{stack.url}/ab-testing/experiments/support-v2/results", headers=bank)
    assert results.status_code == 200, results.text
    # Another tenant cannot see the experiment, nor route into it.
    airline = {"Authorization": f"Bearer {stack.keys['AIRLINE_KEY']}"}
    hidden = httpx.get(f"{stack.url}/ab-testing/experiments/support-v2", headers=airline)
    assert hidden.status_code == 404


def test_experiment_routing_needs_a_user(stack):
    reply = httpx.post(
        f"{stack.url}/v1/completions",
        json={"model": "experiment:support-v2", "prompt": "Hi", "max_tokens": 2},
        headers={"Authorization": f"Bearer {stack.keys['BANK_KEY']}"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["details"][0]["reason"] == "USER_REQUIRED"
