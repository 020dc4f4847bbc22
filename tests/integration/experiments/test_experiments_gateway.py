"""The gateway's experiment routes over the real services (real inference with the real
model and adapters, the real experiments service, real Redis): /ab-testing/experiments
listing, /ab-testing/outcomes, and completions routed with `model: "experiment:<key>"`,
which the gateway assigns itself (the experiments client library, no RPC per request)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from gateway.settings import GatewaySettings
from services.common.channels import open_channel
from services.experiments import assignment
from services.experiments.servicer import SERVICE_NAME
from tests.helpers import eventually, register
from tests.unit.gateway.fake_inference import assert_error

pytestmark = pytest.mark.integration

Tenant = tuple[str, dict[str, str]]
KEY = "support-ab"


@pytest.fixture
async def gateway(inference, experiments_server, exp_redis) -> AsyncIterator[httpx.AsyncClient]:
    inference_server, _ = inference
    experiments, _ = experiments_server
    channels = [
        open_channel(f"127.0.0.1:{inference_server.port}"),
        open_channel(f"127.0.0.1:{experiments.port}"),
    ]
    settings = GatewaySettings(
        inference_addr=f"127.0.0.1:{inference_server.port}", request_timeout_seconds=60
    )
    app = create_app(
        settings, redis=exp_redis, inference_channel=channels[0], experiments_channel=channels[1]
    )
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),  # the experiments client starts listening here
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
    ):
        await app.state.gateway.assigner.wait_listening()
        yield client
    for channel in channels:
        await channel.close()


@pytest.fixture
def new_tenant(exp_redis, stub) -> Callable[[], Awaitable[Tenant]]:
    """A tenant with an API key and two adapters, `support-a` and `support-b`."""

    async def make() -> Tenant:
        tenant = f"g-{uuid.uuid4().hex[:10]}"
        keys = TenantKeyStore(exp_redis)
        await keys.create_tenant(tenant)
        issued = await keys.create_key(tenant)
        await register(stub, tenant, "retailer", name="support-a")
        await register(stub, tenant, "bank", name="support-b")
        return tenant, {"Authorization": f"Bearer {issued.api_key}"}

    return make


def definition(key: str = KEY, **fields: Any) -> dict[str, Any]:
    return {
        "key": key,
        "variants": [
            {"name": "control", "traffic_weight": 0.5, "adapters": [{"name": "support-a"}]},
            {"name": "treatment", "traffic_weight": 0.5, "adapters": [{"name": "support-b"}]},
        ],
        **fields,
    }


async def create(client: httpx.AsyncClient, headers, start: bool = True, **fields) -> None:
    body = definition(**fields)
    created = await client.post("/ab-testing/experiments", json=body, headers=headers)
    assert created.status_code == 201, created.text
    if start:
        await act(client, headers, "EXPERIMENT_ACTION_START", body["key"])


async def act(client: httpx.AsyncClient, headers, action: str, key: str = KEY) -> None:
    reply = await client.patch(
        f"/ab-testing/experiments/{key}", json={"action": action}, headers=headers
    )
    assert reply.status_code == 200, reply.text


async def complete(client: httpx.AsyncClient, headers, user: str, key: str = KEY):
    return await client.post(
        "/v1/completions",
        json={"model": f"experiment:{key}", "user": user, "prompt": "Hi", "max_tokens": 1},
        headers=headers,
    )


def assign_rpcs() -> float:
    """Assign calls the experiments servers of this process have answered, any outcome."""
    return sum(
        REGISTRY.get_sample_value(
            "loraplex_grpc_server_handled_total",
            {"grpc_service": SERVICE_NAME, "grpc_method": "Assign", "grpc_code": code.name},
        )
        or 0.0
        for code in grpc.StatusCode
    )


# -- GET /ab-testing/experiments ------------------------------------------------------------


async def test_listing_pages_through_the_tenants_experiments_only(gateway, new_tenant):
    _, owner = await new_tenant()
    _, other = await new_tenant()
    for i in range(3):
        await create(gateway, owner, start=i == 1, key=f"exp-{i}")
    seen, token = [], ""
    while True:
        page = await gateway.get(
            "/ab-testing/experiments",
            params={"page_size": 2, "page_token": token},
            headers=owner,
        )
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["experiments"]) <= 2
        seen += [(e["key"], e["status"]) for e in body["experiments"]]
        token = body["next_page_token"]
        if not token:
            break
    assert seen == [
        ("exp-0", "EXPERIMENT_STATUS_DRAFT"),
        ("exp-1", "EXPERIMENT_STATUS_RUNNING"),
        ("exp-2", "EXPERIMENT_STATUS_DRAFT"),
    ]
    whole = (await gateway.get("/ab-testing/experiments", headers=owner)).json()
    assert [e["key"] for e in whole["experiments"]] == ["exp-0", "exp-1", "exp-2"]
    assert whole["experiments"][1]["variants"][1]["adapters"][0]["name"] == "support-b"
    # Another tenant sees none of them.
    theirs = await gateway.get("/ab-testing/experiments", headers=other)
    assert theirs.status_code == 200 and theirs.json()["experiments"] == []


async def test_listing_refuses_bad_paging_and_missing_keys(gateway, new_tenant):
    _, headers = await new_tenant()
    bad_token = await gateway.get(
        "/ab-testing/experiments", params={"page_token": "junk"}, headers=headers
    )
    assert assert_error(bad_token, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == (
        "BAD_PAGE_TOKEN"
    )
    too_big = await gateway.get(
        "/ab-testing/experiments", params={"page_size": 1001}, headers=headers
    )
    assert "page_size" in assert_error(too_big, 400, "INVALID_ARGUMENT")["message"]
    anonymous = await gateway.get("/ab-testing/experiments")
    assert_error(anonymous, 401, "UNAUTHENTICATED")


# -- POST /ab-testing/outcomes --------------------------------------------------------------


async def test_outcomes_of_assigned_users_reach_the_results(gateway, new_tenant):
    _, headers = await new_tenant()
    await create(gateway, headers, primary_metric={"name": "rating", "kind": "METRIC_KIND_MEAN"})
    users = [f"user-{i}" for i in range(6)]
    for user in users:  # assigned as their completions are
        assert (await complete(gateway, headers, user)).status_code == 200
    outcomes = [
        {"experiment_key": KEY, "unit_id": user, "metric": "rating", "value": 1 + i % 5}
        for i, user in enumerate(users)
    ] + [{"experiment_key": KEY, "unit_id": "never-seen", "metric": "rating", "value": 5}]
    reply = await gateway.post("/ab-testing/outcomes", json={"outcomes": outcomes}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"recorded": 6, "skipped": 1}

    results = (await gateway.get(f"/ab-testing/experiments/{KEY}/results", headers=headers)).json()
    (rating,) = [m for m in results["metrics"] if m["metric"]["name"] == "rating"]
    assert rating["source"] == "outcomes"
    assert sum(s["units"] for s in rating["stats"]) == 6
    assert sum(s["sum"] for s in rating["stats"]) == pytest.approx(sum(1 + i % 5 for i in range(6)))


BAD_OUTCOMES = {
    "unknown metric": ({"metric": "clicks", "value": 1}, "UNKNOWN_METRIC"),
    "rate that is not 0 or 1": ({"metric": "success", "value": 0.5}, "INVALID_OUTCOME_VALUE"),
    "no unit": ({"metric": "success", "value": 1, "unit_id": ""}, "EMPTY_UNIT_ID"),
}


@pytest.mark.parametrize("case", BAD_OUTCOMES, ids=list(BAD_OUTCOMES))
async def test_bad_outcomes_are_refused_with_a_reason(gateway, new_tenant, case):
    _, headers = await new_tenant()
    await create(gateway, headers)
    fields, reason = BAD_OUTCOMES[case]
    outcome = {"experiment_key": KEY, "unit_id": "u1"} | fields
    reply = await gateway.post(
        "/ab-testing/outcomes", json={"outcomes": [outcome]}, headers=headers
    )
    assert assert_error(reply, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == reason


async def test_outcomes_body_must_parse_and_cannot_reach_another_tenant(gateway, new_tenant):
    owner_id, owner = await new_tenant()
    _, other = await new_tenant()
    await create(gateway, owner)
    assert (await complete(gateway, owner, "u1")).status_code == 200
    garbled = await gateway.post("/ab-testing/outcomes", json={"outcomes": "x"}, headers=owner)
    assert assert_error(garbled, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == "BAD_BODY"
    # A tenant named in the body is ignored: the key decides, and the other tenant has no
    # such experiment.
    outcome = {"experiment_key": KEY, "unit_id": "u1", "metric": "success", "value": 1}
    foreign = await gateway.post(
        "/ab-testing/outcomes", json={"tenant": owner_id, "outcomes": [outcome]}, headers=other
    )
    assert assert_error(foreign, 404, "NOT_FOUND")["details"][0]["reason"] == (
        "EXPERIMENT_NOT_FOUND"
    )
    results = (await gateway.get(f"/ab-testing/experiments/{KEY}/results", headers=owner)).json()
    (success,) = results["metrics"]
    assert sum(s["units"] for s in success["stats"]) == 0  # nothing was recorded


# -- completions through `experiment:<key>` -------------------------------------------------


def users(coverage: float) -> dict[str, str]:
    """One user per outcome (by GrowthBook's hashing): in control, in treatment, and left
    out by coverage although the hash falls in the treatment's half."""
    found: dict[str, str] = {}
    for i in range(1000):
        user = f"user-{i}"
        got = assignment.assign(user, KEY, 2, [0.5, 0.5], coverage)
        if got.in_experiment:
            kind = ("control", "treatment")[got.variant_index]
        elif got.bucket >= 0.5:
            kind = "excluded"
        else:
            continue
        found.setdefault(kind, user)
    assert len(found) == 3
    return found


async def test_completions_are_routed_by_local_assignment(gateway, new_tenant):
    _, headers = await new_tenant()
    await create(gateway, headers, coverage=0.4)
    rpcs_before = assign_rpcs()
    want = {
        "control": ("support-a", "control", True),
        "treatment": ("support-b", "treatment", True),
        # left out: the control serves it, and it is not counted in the experiment
        "excluded": ("support-a", "control", False),
    }
    served = {}
    for kind, user in users(0.4).items():
        for _ in range(2):  # sticky: the same answer every time
            reply = await complete(gateway, headers, user)
            assert reply.status_code == 200, reply.text
            extras = reply.json()["loraplex"]
            routed = extras["experiment"]
            got = (extras["adapter"]["name"], routed["variant"], routed["in_experiment"])
            assert got == want[kind], kind
            assert routed["key"] == KEY
        served[kind] = routed["variant"]
    assert assign_rpcs() == rpcs_before  # assigned in the gateway: no Assign RPC
    # The Assign RPC (for other callers) gives the same variant for each user.
    for kind, user in users(0.4).items():
        reply = await gateway.post(
            "/ab-testing/assign", json={"experiment": KEY, "unit_id": user}, headers=headers
        )
        assert reply.json()["variant"]["name"] == served[kind]
        assert reply.json()["sticky"] == (kind != "excluded")


async def test_a_stopped_or_unknown_experiment_refuses_completions(gateway, new_tenant):
    _, headers = await new_tenant()
    await create(gateway, headers)
    assert (await complete(gateway, headers, "u1")).status_code == 200
    await act(gateway, headers, "EXPERIMENT_ACTION_STOP")

    async def refused() -> httpx.Response | None:
        reply = await complete(gateway, headers, "u1")
        return reply if reply.status_code != 200 else None

    stopped = await eventually(refused)  # the stop is announced to the gateway's client
    assert stopped is not None, "the gateway kept routing into a stopped experiment"
    error = assert_error(stopped, 400, "FAILED_PRECONDITION")
    assert error["details"][0]["reason"] == "EXPERIMENT_NOT_RUNNING"
    unknown = await complete(gateway, headers, "u1", key="no-such-experiment")
    assert assert_error(unknown, 404, "NOT_FOUND")["details"][0]["reason"] == (
        "EXPERIMENT_NOT_FOUND"
    )
    _, other = await new_tenant()  # another tenant cannot route into it
    theirs = await complete(gateway, other, "u1")
    assert assert_error(theirs, 404, "NOT_FOUND")["details"][0]["reason"] == (
        "EXPERIMENT_NOT_FOUND"
    )
