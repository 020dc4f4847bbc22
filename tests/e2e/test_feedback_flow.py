"""Active learning end to end on the local stack: completions made with the openai client
land in the tenant's feedback queue ordered by uncertainty; a reviewer leases and answers
them over REST; the answers export in each TRL format and reach analytics as ratings."""

from __future__ import annotations

import json
import time
import uuid

import datasets
import httpx
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [
    "Customer: Where is my order 4821?\nAgent:",
    "Customer: I lost my card yesterday.\nAgent:",
    "Customer: Can I bring a second bag?\nAgent:",
    "Customer: Hi there.\nAgent:",
    "Customer: The blender I bought is broken, smoke came out.\nAgent:",
]


def new_tenant(stack) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {stack.keys['LORAPLEX_ADMIN_KEY']}"}
    tenant = f"fb-{uuid.uuid4().hex[:8]}"
    httpx.post(
        f"{stack.url}/admin/tenants", json={"tenant": tenant}, headers=admin
    ).raise_for_status()
    key = httpx.post(f"{stack.url}/admin/tenants/{tenant}/keys", headers=admin)
    key.raise_for_status()
    return {"Authorization": f"Bearer {key.json()['api_key']}"}


def until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def test_outputs_are_queued_by_uncertainty_reviewed_and_exported(stack):
    headers = new_tenant(stack)
    api = httpx.Client(base_url=stack.url, headers=headers, timeout=60)
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=headers["Authorization"][7:])
    entropy = {}
    for prompt in PROMPTS:
        reply = client.completions.create(
            model="loraplex-tiny", prompt=prompt, max_tokens=16, temperature=0
        )
        entropy[reply.id] = reply.to_dict()["loraplex"]["uncertainty"]["mean_token_entropy"]
    assert until(lambda: api.get("/feedback/stats").json()["queued"] == len(PROMPTS))

    leases = [api.get("/feedback/next", params={"reviewer": "ana"}).json() for _ in PROMPTS]
    ids = [lease["item"]["id"] for lease in leases]
    assert ids == sorted(entropy, key=entropy.get, reverse=True)
    assert [lease["item"]["priority"] for lease in leases] == pytest.approx(
        sorted(entropy.values(), reverse=True), rel=1e-5
    )
    assert {lease["item"]["prompt"] for lease in leases} == set(PROMPTS)
    assert api.get("/feedback/next", params={"reviewer": "ana"}).json() == {"item": None}
    # Another tenant's queue is empty: it never sees these outputs.
    other = httpx.get(
        f"{stack.url}/feedback/next", params={"reviewer": "ana"}, headers=new_tenant(stack)
    )
    assert other.json() == {"item": None}

    answers = [{"rating": 5}, {"rating": 1}, {"thumbs": "up"}, {"thumbs": "down"}]
    answers.append({"corrected_text": " I can help with that. What is your order number?"})
    for lease, answer in zip(leases, answers, strict=True):
        body = {"item_id": lease["item"]["id"], "reviewer": "ana", "lease_id": lease["lease_id"]}
        reply = api.post("/feedback", json=body | answer)
        assert reply.status_code == 200, reply.text
        assert reply.json()["closed"] is True

    rows = {}
    for fmt, fields in (
        ("sft", {"prompt", "completion"}),
        ("dpo", {"prompt", "chosen", "rejected"}),
        ("kto", {"prompt", "completion", "label"}),
    ):
        reply = api.get("/feedback/export", params={"format": fmt})
        assert reply.status_code == 200
        rows[fmt] = [json.loads(line) for line in reply.text.splitlines()]
        assert all(set(r) == fields for r in rows[fmt])
        # What TRL's trainers read: the export as it came over HTTP, through `datasets`.
        saved = stack.run_dir / f"export.{fmt}.jsonl"
        saved.write_text(reply.text)
        loaded = datasets.load_dataset(
            "json", data_files=str(saved), split="train", cache_dir=str(stack.run_dir / "hf")
        )
        assert set(loaded.column_names) == fields and [dict(r) for r in loaded] == rows[fmt]
    by_id = {lease["item"]["id"]: lease["item"] for lease in leases}
    assert len(rows["sft"]) == 3  # rated 5, thumbs up, the correction
    assert rows["dpo"] == [
        {
            "prompt": by_id[ids[4]]["prompt"],
            "chosen": answers[4]["corrected_text"],
            "rejected": by_id[ids[4]]["output"],
        }
    ]
    assert sorted(r["label"] for r in rows["kto"]) == [False, False, False, True, True, True]

    def ratings():
        reply = api.get("/analytics/adapters/loraplex-tiny", params={"window": "1h"})
        return reply.json()["metrics"] if reply.json()["metrics"]["rating_count"] else None

    metrics = until(ratings)
    assert metrics and metrics["rating_count"] == 2 and metrics["rating_mean"] == 3.0
