"""The Training tab (the product spec's Custom Training UI, zero-code) in Streamlit's own
test runner.

On the real stack: the workflow is offered, and federation shows each aggregate's error.
Against a stand-in of the /training routes (gateway/training_routes.py's contract): a job that
advances one step per read, watched to 100 % and promoted; changed defaults; refusals, and a
gateway without training routes (404) or service (503), read as messages. (The real stack's
training job to 100 % is in the browser test.)
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
import numpy as np
import pytest
from safetensors.numpy import load, save

from console.client import Gateway
from tests.e2e.console.conftest import ConsoleTenant, no_errors, tab_test, texts
from tests.helpers import DEMO_ADAPTERS, adapter_files

pytestmark = [pytest.mark.e2e]

NOT_AVAILABLE = "Training service not available."


def test_the_real_stack_offers_the_workflow(console_tenant: ConsoleTenant) -> None:
    at = tab_test("training", console_tenant.api()).run()
    no_errors(at)
    assert NOT_AVAILABLE not in texts(at)
    assert {"Start training", "Federate"} <= {b.label for b in at.button}


def perturbed_adapter(seed: int) -> dict[str, bytes]:
    """The retailer's demo adapter with seeded noise on every factor: same shape and
    targets, other weights (so that averaging A and B apart is not exact)."""
    rng = np.random.default_rng(seed)
    files = adapter_files(DEMO_ADAPTERS / "retailer")
    tensors = {
        k: (v + rng.normal(0, float(v.std()), v.shape)).astype(np.float32)
        for k, v in load(files["adapter_model.safetensors"]).items()
    }
    return {**files, "adapter_model.safetensors": save(tensors)}


def fedavg_error(adapters: list[dict[str, bytes]], weights: list[float]) -> float:
    """numpy: ||(sum w B)(sum w A) - sum w BA||_F / ||sum w BA||_F over all layers (the
    scale alpha/r is the same for all and cancels)."""
    factors = [load(a["adapter_model.safetensors"]) for a in adapters]
    diff = norm = 0.0
    for name in factors[0]:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        pairs = [(f[b_name].astype(np.float64), f[name].astype(np.float64)) for f in factors]
        exact = sum(w * b @ a for (b, a), w in zip(pairs, weights, strict=True))
        mean_b = sum(w * b for (b, _), w in zip(pairs, weights, strict=True))
        mean_a = sum(w * a for (_, a), w in zip(pairs, weights, strict=True))
        diff += float(np.sum((mean_b @ mean_a - exact) ** 2))
        norm += float(np.sum(exact**2))
    return (diff / norm) ** 0.5


def test_federation_shows_each_aggregates_error(stack) -> None:
    """A tenant with two adapters of one shape federates them from the tab: the weights
    from the sample counts, and the error table, against numpy's numbers."""
    admin = httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=120
    )
    tenant = f"fed-{uuid.uuid4().hex[:6]}"
    admin.post("/admin/tenants", json={"tenant": tenant}).raise_for_status()
    key = admin.post(f"/admin/tenants/{tenant}/keys").json()["api_key"]
    sites = {"site-a": perturbed_adapter(1), "site-b": perturbed_adapter(2)}
    for name, files in sites.items():
        registered = admin.post(
            f"/admin/tenants/{tenant}/adapters",
            data={"name": name},
            files=[("files", item) for item in files.items()],
        )
        assert registered.status_code == 201, registered.text
    at = tab_test("training", Gateway(stack.url, key)).run()
    no_errors(at)

    def federate(method: str, samples: str) -> None:
        at.multiselect(key="fed_adapters").set_value(["site-a", "site-b"])
        at.selectbox(key="fed_method").set_value(method)
        next(t for t in at.text_input if t.label.startswith("Samples")).input(samples)
        next(b for b in at.button if b.label == "Federate").click().run()

    federate("fedavg", "300 100")
    no_errors(at)
    weights = next(d.value for d in at.dataframe if "weight" in d.value.columns)
    assert weights["weight"].tolist() == pytest.approx([0.75, 0.25])  # 300 : 100
    federate("stack", "")
    no_errors(at)
    table = next(d.value for d in at.dataframe if "relative error" in d.value.columns)
    assert table["method"].tolist() == ["stack", "fedavg"]  # newest first
    expected = fedavg_error(list(sites.values()), [0.75, 0.25])
    assert expected > 0.01  # averaging the factors apart is off here
    assert table["relative error"].tolist() == pytest.approx([0.0, expected], rel=1e-3, abs=1e-5)
    # A refusal reads as the service's message and reason.
    at.multiselect(key="fed_adapters").set_value(["site-a"])
    at.selectbox(key="fed_method").set_value("stack")
    next(b for b in at.button if b.label == "Federate").click().run()
    assert not at.exception
    assert re.search(r"\([A-Z_]+, HTTP 400\)$", at.error[0].value), at.error[0].value


class FakeTraining:
    """Issue 11's /training routes for one tenant, in memory; every read of a running job
    advances it one step, so a watcher sees it progress and finish."""

    STEPS = 4

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.actions: list[str] = []
        self.candidate_state = "CANDIDATE_STATE_CANDIDATE"

    def job(self, job_id: str, body: dict) -> dict:
        return {
            "id": job_id,
            "tenant": "t",
            "adapter": body["adapter"],
            "method": "TRAINING_METHOD_" + body["method"].upper(),
            "state": "JOB_STATE_QUEUED",
            "data_source": next(iter(body["data"])),
            "progress": {
                "step": 0,
                "total_steps": self.STEPS,
                "epoch": 0,
                "loss": 0.0,
                "tokens_per_second": 0.0,
                "eta_seconds": 0.0,
            },
            "candidate": {"name": "", "version": 0},
            "record": {},
            "error_reason": "",
            "error_message": "",
        }

    def advance(self, job: dict) -> None:
        p = job["progress"]
        if job["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING"):
            p["step"] += 1
            p["loss"], p["eval_loss"] = 2.0 / p["step"], 2.2 / p["step"]
            p["tokens_per_second"], p["eta_seconds"] = 900.0, self.STEPS - p["step"]
            job["state"] = "JOB_STATE_RUNNING"
            if p["step"] == self.STEPS:
                job["state"] = "JOB_STATE_SUCCEEDED"
                job["candidate"] = {"name": job["adapter"], "version": 2}
                job["record"] = {"eval_loss_before": 2.5, "eval_loss": p["eval_loss"]}

    def candidates(self) -> list[dict]:
        return [
            {
                "adapter": j["candidate"],
                "state": self.candidate_state,
                "job_id": j["id"],
                "record": j["record"],
            }
            for j in self.jobs.values()
            if j["state"] == "JOB_STATE_SUCCEEDED"
        ]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if path == "/composition/adapters":
            return httpx.Response(200, json={"adapters": [{"name": "support", "shared": False}]})
        if path == "/training/jobs" and method == "GET":
            return httpx.Response(200, json={"jobs": list(self.jobs.values())[::-1]})
        if path == "/training/jobs" and method == "POST":
            body = json.loads(request.content)
            self.created.append(body)
            if not body["adapter"]:
                error = {"code": 400, "status": "INVALID_ARGUMENT", "message": "name the adapter"}
                error["details"] = [{"reason": "BAD_ADAPTER_NAME"}]
                return httpx.Response(400, json={"error": error})
            job_id = f"job-{len(self.jobs) + 1}"
            self.jobs[job_id] = self.job(job_id, body)
            return httpx.Response(201, json=self.jobs[job_id])
        if match := re.fullmatch(r"/training/jobs/([\w-]+)", path):
            job = self.jobs[match[1]]
            self.advance(job)
            return httpx.Response(200, json=job)
        if path == "/training/candidates":
            return httpx.Response(200, json={"candidates": self.candidates()})
        if match := re.fullmatch(r"/training/candidates/(.+@\d+)/(\w+)", path):
            self.actions.append(f"{match[2]} {match[1]}")
            self.candidate_state = "CANDIDATE_STATE_PROMOTED"
            return httpx.Response(200, json={"candidate": self.candidates()[0]})
        return httpx.Response(404, json={"error": {"code": 404, "message": "Not Found"}})


def test_train_watch_to_100_percent_and_promote() -> None:
    fake = FakeTraining()
    api = Gateway("http://gateway", "lpx_key", transport=httpx.MockTransport(fake))
    at = tab_test("training", api).run()
    no_errors(at)
    assert NOT_AVAILABLE not in texts(at)
    at.button[0].click().run()  # Start training, the defaults kept
    no_errors(at)
    assert fake.created == [
        {
            "adapter": "support",
            "method": "sft",
            "data": {"feedback": {}},
            "params": {},
            "init_adapter": {"name": "support"},
        }
    ]
    seen = []
    for _ in range(2 * FakeTraining.STEPS):
        seen.append(at.get("progress")[0].proto.text)
        if seen[-1].startswith("succeeded"):
            break
        at.run()
        no_errors(at)
    assert seen[0].startswith("running: step 1 of 4 (25%)")
    assert seen[-1] == "succeeded: step 4 of 4 (100%)"
    assert at.get("vega_lite_chart"), "the loss chart"
    assert "Candidate support@2: held-out loss 2.5000 → 0.5500" in texts(at)
    at.button(key="cand_promote").click().run()
    no_errors(at)
    assert fake.actions == ["promote support@2"]
    assert at.dataframe[-1].value["state"].tolist() == ["promoted"]


def test_refusals_and_missing_routes_read_as_messages() -> None:
    fake = FakeTraining()
    api = Gateway("http://gateway", "lpx_key", transport=httpx.MockTransport(fake))
    at = tab_test("training", api).run()
    at.text_input[0].input("")
    at.button[0].click().run()
    assert not at.exception
    assert at.error[0].value == "name the adapter (BAD_ADAPTER_NAME, HTTP 400)"

    def disabled(request: httpx.Request) -> httpx.Response:
        error = {"code": 503, "status": "UNAVAILABLE", "message": "training is not configured"}
        error["details"] = [{"reason": "TRAINING_DISABLED"}]
        return httpx.Response(503, json={"error": error})

    api = Gateway("http://gateway", "lpx_key", transport=httpx.MockTransport(disabled))
    at = tab_test("training", api).run()
    assert not at.exception and not at.error
    assert NOT_AVAILABLE in at.info[0].value and "TRAINING_DISABLED" in at.info[0].value
    assert not at.button  # nothing to start

    def no_route(request: httpx.Request) -> httpx.Response:  # a gateway without /training
        return httpx.Response(404, json={"detail": "Not Found"})

    api = Gateway("http://gateway", "lpx_key", transport=httpx.MockTransport(no_route))
    at = tab_test("training", api).run()
    assert not at.exception and not at.error
    assert NOT_AVAILABLE in at.info[0].value and "HTTP 404" in at.info[0].value


def test_changed_defaults_show_at_once_and_are_sent() -> None:
    fake = FakeTraining()
    api = Gateway("http://gateway", "lpx_key", transport=httpx.MockTransport(fake))
    at = tab_test("training", api).run()
    assert not [n for n in at.number_input if n.label == "Max steps (0: epochs)"]
    at.checkbox(key="train_change").check().run()  # the fields appear before any submit
    no_errors(at)
    next(n for n in at.number_input if n.label == "Max steps (0: epochs)").set_value(2)
    next(n for n in at.number_input if n.label == "Batch size").set_value(2)
    next(b for b in at.button if b.label == "Start training").click().run()
    no_errors(at)
    assert fake.created[0]["params"] == {
        "rank": 8,
        "learning_rate": 2e-4,
        "max_steps": 2,
        "epochs": 1,
        "batch_size": 2,
        "heldout_fraction": 0.1,
        "seed": 0,
    }
