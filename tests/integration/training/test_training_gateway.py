"""The gateway's /training routes over the real training and inference services: tenant
scoping, SSE progress, candidates by <adapter>@<version>, federation (the tenant's own, and
the admin's across tenants), errors as AIP-193 bodies with their reasons."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from gateway.settings import GatewaySettings
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from services.common.channels import open_channel
from services.common.redis import connect
from tests.helpers import register
from tests.training_data import reference_pairs, to_jsonl
from tests.unit.gateway.fake_inference import assert_error

pytestmark = pytest.mark.integration
ADMIN = "lpx_admin_training_tests"
JOB = {
    "adapter": "support",
    "method": "sft",
    "data": {"upload": {"jsonl": to_jsonl(reference_pairs("retailer", 12))}},
    "params": {"max_steps": 2},
}


@pytest.fixture
async def client(training_servers, redis_url) -> AsyncIterator[httpx.AsyncClient]:
    redis = connect(redis_url)
    channels = [
        open_channel(training_servers.inference_addr),
        open_channel(f"127.0.0.1:{training_servers.server.port}"),
    ]
    settings = GatewaySettings(
        inference_addr=training_servers.inference_addr, loraplex_admin_key=ADMIN
    )
    app = create_app(
        settings, redis=redis, inference_channel=channels[0], training_channel=channels[1]
    )
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as c,
    ):
        c.redis = redis  # type: ignore[attr-defined]
        yield c
    for channel in channels:
        await channel.close()
    await redis.aclose()


async def tenant_headers(client) -> tuple[str, dict[str, str]]:
    tenant = f"g-{uuid.uuid4().hex[:10]}"
    keys = TenantKeyStore(client.redis)
    await keys.create_tenant(tenant)
    issued = await keys.create_key(tenant)
    return tenant, {"Authorization": f"Bearer {issued.api_key}"}


def reason(error: dict) -> str:
    return next(d["reason"] for d in error["details"] if "reason" in d)


async def test_jobs_are_tenant_scoped_cancel_once_and_stream_events(client):
    _, mine = await tenant_headers(client)
    _, theirs = await tenant_headers(client)
    created = await client.post("/training/jobs", json=JOB, headers=mine)
    assert created.status_code == 201, created.text
    job = created.json()
    assert (
        job["state"] == "JOB_STATE_QUEUED" and job["train_examples"] + job["heldout_examples"] == 12
    )
    listed = (await client.get("/training/jobs", headers=mine)).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert (await client.get("/training/jobs", headers=theirs)).json()["jobs"] == []
    other = await client.get(f"/training/jobs/{job['id']}", headers=theirs)
    assert reason(assert_error(other, 404, "NOT_FOUND")) == "JOB_NOT_FOUND"
    events = await client.get(f"/training/jobs/{job['id']}/events", headers=theirs)
    assert_error(events, 404, "NOT_FOUND")

    cancelled = await client.post(f"/training/jobs/{job['id']}/cancel", headers=mine)
    assert cancelled.json()["state"] == "JOB_STATE_CANCELLED"
    again = await client.post(f"/training/jobs/{job['id']}/cancel", headers=mine)
    assert reason(assert_error(again, 400, "FAILED_PRECONDITION")) == "JOB_FINISHED"

    async with client.stream("GET", f"/training/jobs/{job['id']}/events", headers=mine) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = (await stream.aread()).decode()
    events = [block for block in body.split("\n\n") if block]
    assert len(events) == 1 and events[0].startswith("event: job\ndata: ")
    assert json.loads(events[0].split("data: ", 1)[1])["state"] == "JOB_STATE_CANCELLED"


async def test_bad_requests_get_reasons(client):
    _, mine = await tenant_headers(client)
    cases = [
        (
            "/training/jobs",
            {**JOB, "data": {}},
            (400, "INVALID_ARGUMENT", "NO_DATA_SOURCE"),
        ),
        ("/training/jobs", {**JOB, "colour": "red"}, (400, "INVALID_ARGUMENT", "BAD_BODY")),
        (
            "/training/jobs",
            {**JOB, "params": {"rank": 100000}},
            (400, "INVALID_ARGUMENT", "PARAM_OUT_OF_RANGE"),
        ),
        ("/training/candidates/support/promote", None, (400, "INVALID_ARGUMENT", "BAD_CANDIDATE")),
        ("/training/candidates/support@9/promote", None, (404, "NOT_FOUND", "CANDIDATE_NOT_FOUND")),
        ("/training/candidates/support@9/discard", None, (404, "NOT_FOUND", "CANDIDATE_NOT_FOUND")),
        (
            "/training/federations",
            {"participants": [], "method": "stack", "output_name": "m"},
            (400, "INVALID_ARGUMENT", "TOO_FEW_ADAPTERS"),
        ),
    ]
    for path, body, (http, status, why) in cases:
        reply = await client.post(path, json=body, headers=mine)
        assert reason(assert_error(reply, http, status)) == why, (path, reply.text)
    assert_error(await client.post("/training/jobs", json=JOB), 401, "UNAUTHENTICATED")
    assert_error(
        await client.post("/admin/training/federations", json={}, headers=mine),
        401,
        "UNAUTHENTICATED",
    )


async def test_admin_federates_opt_in_tenants_into_a_shared_adapter(client, stub):
    a, _ = await tenant_headers(client)
    b, mine = await tenant_headers(client)
    await register(stub, a, "retailer", name="site")
    await register(stub, b, "retailer", name="site")
    name = f"federated-{uuid.uuid4().hex[:6]}"
    body = {
        "participants": [
            {"tenant": a, "adapter": {"name": "site"}, "num_samples": 10},
            {"tenant": b, "adapter": {"name": "site"}, "num_samples": 30},
        ],
        "method": "svd",
        "rank": 4,
        "output_name": name,
    }
    reply = await client.post(
        "/admin/training/federations", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert reply.status_code == 201, reply.text
    out = reply.json()
    assert out["adapter"]["shared"] and out["rank"] == 4
    assert out["weights"] == pytest.approx([0.25, 0.75])
    # identical adapters: their mean is the adapter itself, of rank 8; rank 4 loses some
    assert 0 < out["relative_error"] < 1
    served = await stub.GetAdapter(
        ipb.GetAdapterRequest(tenant=b, adapter=common_pb2.AdapterRef(name=name))
    )
    assert served.adapter.shared and served.serving
    # a tenant cannot federate another tenant's adapters
    tenant_body = {**body, "output_name": "mine"}
    denied = await client.post("/training/federations", json=tenant_body, headers=mine)
    assert reason(assert_error(denied, 404, "NOT_FOUND")) == "ADAPTER_NOT_FOUND"
