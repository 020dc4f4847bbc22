"""The closed loop on the demo stack, through the gateway's REST API: completions ->
feedback (a scripted reviewer corrects each answer with the held-out reference) -> a
training job on that feedback, continuing the current version, with progress streamed as
server-sent events -> a candidate whose loss on held-out replies of the tenant's text (other
dialogs than the ones reviewed, scored by the inference service) is lower than the current
version's -> an A/B experiment -> promotion -> completions served by the new version ->
rollback to the old one.

(The session's stack is stopped by test_openai_client's last test, so this module must sort
before it.)"""

from __future__ import annotations

import json
import time
import uuid

import grpc
import httpx
import pytest

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from tests.helpers import DEMO_ADAPTERS
from tests.training_data import reference_pairs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REVIEWED = reference_pairs("retailer", 24)
HELDOUT = reference_pairs("retailer", 40, skip=24)  # never reviewed nor trained on


def heldout_loss(stack, tenant: str, version: int) -> float:
    """Mean per-token negative log-likelihood of the held-out replies, by the served model."""
    with grpc.insecure_channel(stack.addrs["inference"]) as channel:
        stub = ipb_grpc.InferenceServiceStub(channel)
        total, tokens = 0.0, 0
        for pair in HELDOUT:
            reply = stub.Score(
                ipb.ScoreRequest(
                    tenant=tenant,
                    adapter=common_pb2.AdapterRef(name="support", version=version),
                    prompt=pair["prompt"],
                    completions=[pair["completion"]],
                )
            )
            total -= reply.scores[0].total_logprob
            tokens += reply.scores[0].num_tokens
    return total / tokens


def sse_jobs(api: httpx.Client, job_id: str) -> list[dict]:
    jobs = []
    with api.stream("GET", f"/training/jobs/{job_id}/events", timeout=300) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                jobs.append(json.loads(line.removeprefix("data: ")))
    return jobs


def test_feedback_trains_a_better_candidate_that_is_tested_promoted_and_rolled_back(stack):
    started = time.perf_counter()
    admin = {"Authorization": f"Bearer {stack.keys['LORAPLEX_ADMIN_KEY']}"}
    tenant = f"loop-{uuid.uuid4().hex[:8]}"
    httpx.post(
        f"{stack.url}/admin/tenants", json={"tenant": tenant}, headers=admin
    ).raise_for_status()
    key = httpx.post(f"{stack.url}/admin/tenants/{tenant}/keys", headers=admin).json()["api_key"]
    # The tenant's current adapter was trained on another domain (the bank's dialogs): the
    # feedback on its answers to retailer customers is what teaches it the retailer's replies.
    files = [
        ("files", (p.name, p.read_bytes())) for p in sorted((DEMO_ADAPTERS / "bank").iterdir())
    ]
    httpx.post(
        f"{stack.url}/admin/tenants/{tenant}/adapters",
        data={"name": "support"},
        files=files,
        headers=admin,
        timeout=60,
    ).raise_for_status()
    api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    # 1. completions by the current version (v1); each lands in the feedback queue
    for pair in REVIEWED:
        reply = api.post(
            "/v1/completions",
            json={"model": "support", "prompt": pair["prompt"], "max_tokens": 12, "temperature": 0},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["loraplex"]["adapter"]["version"] == 1
    deadline = time.monotonic() + 60
    while api.get("/feedback/stats").json()["queued"] < len(REVIEWED):
        assert time.monotonic() < deadline, "completions did not reach the feedback queue"
        time.sleep(0.3)

    # 2. a scripted reviewer corrects every answer with the held-out reference
    references = {p["prompt"]: p["completion"] for p in REVIEWED}
    for _ in REVIEWED:
        lease = api.get("/feedback/next", params={"reviewer": "script"}).json()
        item = lease["item"]
        answer = api.post(
            "/feedback",
            json={
                "item_id": item["id"],
                "reviewer": "script",
                "lease_id": lease["lease_id"],
                "corrected_text": references[item["prompt"]],
            },
        )
        assert answer.status_code == 200, answer.text

    # 3. a training job on that feedback, continuing v1, progress streamed as SSE
    created = api.post(
        "/training/jobs",
        json={
            "adapter": "support",
            "method": "sft",
            "data": {"feedback": {"adapter": "support"}},
            "init_adapter": {"name": "support"},
            "params": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-3, "seed": 1},
            # (append_eos stays off: config/training.yaml's default for the demo model)
        },
    )
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["data_source"] == "feedback"
    assert job["train_examples"] + job["heldout_examples"] == len(REVIEWED)
    events = sse_jobs(api, job["id"])
    final = events[-1]
    assert final["state"] == "JOB_STATE_SUCCEEDED", final["error_message"]
    steps = [e["progress"]["step"] for e in events if e["progress"]["step"]]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] == 12
    assert any(e["progress"]["eta_seconds"] > 0 for e in events if e["progress"]["step"] < 12)
    version = final["candidate"]["version"]
    assert version == 2

    # 4. the candidate is better on held-out text of the tenant than the current version
    current, candidate = heldout_loss(stack, tenant, 1), heldout_loss(stack, tenant, 2)
    assert candidate < current, (candidate, current)

    # 5. A/B experiment current vs candidate, then promotion
    experiment = api.post(
        f"/training/candidates/support@{version}/experiment", json={"candidate_traffic": 0.5}
    )
    assert experiment.status_code == 201, experiment.text
    key = experiment.json()["experiment_key"]
    assert api.get(f"/ab-testing/experiments/{key}").json()["status"] == "EXPERIMENT_STATUS_RUNNING"
    promoted = api.post(f"/training/candidates/support@{version}/promote")
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["previous_version"] == 1
    assert api.get(f"/ab-testing/experiments/{key}").json()["status"] == "EXPERIMENT_STATUS_STOPPED"

    def served_version() -> int:
        reply = api.post(
            "/v1/completions",
            json={"model": "support", "prompt": HELDOUT[0]["prompt"], "max_tokens": 4},
        )
        return reply.json()["loraplex"]["adapter"]["version"]

    assert served_version() == 2
    again = api.post(f"/training/candidates/support@{version}/promote")
    assert again.status_code == 400 and "NOT_A_CANDIDATE" in again.text

    # 6. rollback: the old version serves again
    rolled = api.post("/composition/rollback", json={"adapter": "support"})
    assert rolled.status_code == 200, rolled.text
    assert served_version() == 1
    print(
        f"\nloop: {time.perf_counter() - started:.1f}s, held-out loss v1 {current:.4f} -> "
        f"candidate {candidate:.4f}, job {final['record']['tokens_per_second']:.0f} tokens/s"
    )
