"""Keys have scopes: a tenant key calls the tenant's API, a reviewer key only its review
queue, a metrics key only /metrics; and /metrics labels never carry names a client made up."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from gateway.app import create_app
from services.common.errors import InvalidArgument
from tests.unit.gateway.fake_inference import (
    ADMIN_KEY,
    BASE_MODEL,
    FakeInference,
    NewTenant,
    adapter_info,
    assert_error,
    gateway_settings,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def bearer(issued: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {issued['api_key']}"}


async def new_key(client: httpx.AsyncClient, tenant: str, scope: str) -> dict[str, str]:
    response = await client.post(
        f"/admin/tenants/{tenant}/keys", headers=ADMIN, json={"scope": scope}
    )
    assert response.status_code == 201, response.text
    assert response.json()["scope"] == scope
    return bearer(response.json())


async def test_a_reviewer_key_reaches_the_review_queue_and_nothing_else(
    client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference
) -> None:
    await new_tenant("bank")
    reviewer = await new_key(client, "bank", "reviewer")
    # Past authentication: this gateway has no active-learning service, hence 503.
    response = await client.get("/feedback/stats", headers=reviewer)
    assert_error(response, 503, "UNAVAILABLE")
    for method, path, body in [
        ("post", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi"}),
        ("get", "/v1/models", None),
        ("get", "/analytics/top-performers", None),
        ("get", "/metrics", None),
    ]:
        response = await client.request(method, path, headers=reviewer, json=body)
        error = assert_error(response, 403, "PERMISSION_DENIED")
        assert error["details"][0]["reason"] == "KEY_SCOPE"
    assert not fake.requests["Generate"]


async def test_metrics_need_the_metrics_scope_or_the_admin_key(
    client: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    tenant_key = await new_tenant("bank")
    assert_error(await client.get("/metrics"), 401, "UNAUTHENTICATED")
    assert_error(await client.get("/metrics", headers=tenant_key), 403, "PERMISSION_DENIED")
    assert (await client.get("/metrics", headers=ADMIN)).status_code == 200
    response = await client.post("/admin/metrics-keys", headers=ADMIN)
    assert response.status_code == 201 and response.json()["scope"] == "metrics"
    scraper = bearer(response.json())
    assert (await client.get("/metrics", headers=scraper)).status_code == 200
    assert_error(await client.get("/v1/models", headers=scraper), 403, "PERMISSION_DENIED")
    # Probes stay open: they say only up or down.
    assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    ("scope", "reason"), [("metrics", "SCOPE_NOT_FOR_TENANT"), ("boss", "UNKNOWN_SCOPE")]
)
async def test_a_tenant_key_of_a_wrong_scope_is_refused(
    client: httpx.AsyncClient, new_tenant: NewTenant, scope: str, reason: str
) -> None:
    await new_tenant("bank")
    response = await client.post("/admin/tenants/bank/keys", headers=ADMIN, json={"scope": scope})
    assert assert_error(response, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == reason


async def test_a_reviewer_key_can_be_revoked_by_its_tenant_path_only(
    client: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    await new_tenant("bank")
    await new_tenant("shop")
    created = await client.post(
        "/admin/tenants/bank/keys", headers=ADMIN, json={"scope": "reviewer"}
    )
    key_id = created.json()["key_id"]
    wrong = await client.delete(f"/admin/tenants/shop/keys/{key_id}", headers=ADMIN)
    assert_error(wrong, 404, "NOT_FOUND")
    assert (await client.get("/feedback/stats", headers=bearer(created.json()))).status_code == 503
    right = await client.delete(f"/admin/tenants/bank/keys/{key_id}", headers=ADMIN)
    assert right.status_code == 204
    gone = await client.get("/feedback/stats", headers=bearer(created.json()))
    assert_error(gone, 401, "UNAUTHENTICATED")


async def test_metric_labels_carry_only_adapters_that_served(
    client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference
) -> None:
    bank = await new_tenant("bank")
    fake.adapters.append(adapter_info("bank", "fraud"))
    made_up = "m" * 2000
    fake.fail["Generate"] = InvalidArgument("bad name", reason="INVALID_ADAPTER_NAME")
    for name in (made_up, "fraud"):
        response = await client.post(
            "/v1/completions", headers=bank, json={"model": name, "prompt": "hi"}
        )
        assert response.status_code == 400
    del fake.fail["Generate"]
    served = await client.post(
        "/v1/completions", headers=bank, json={"model": "fraud", "prompt": "hi"}
    )
    assert served.status_code == 200
    text = (await client.get("/metrics", headers=ADMIN)).text
    assert made_up not in text
    assert 'adapter="fraud"' in text


async def test_the_deployments_static_metrics_key_reads_metrics_and_nothing_else(
    inference, redis_client, channel
) -> None:
    settings = gateway_settings(inference.addr).model_copy(
        update={"metrics_key": SecretStr("lpx_metrics_static")}
    )
    app = create_app(settings, redis=redis_client, inference_channel=channel)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        scraper = {"Authorization": "Bearer lpx_metrics_static"}
        assert (await client.get("/metrics", headers=scraper)).status_code == 200
        who = await client.get("/whoami", headers=scraper)
        assert who.json() == {"scope": "metrics", "tenant": ""}
        wrong = {"Authorization": "Bearer lpx_metrics_statiC"}
        assert_error(await client.get("/metrics", headers=wrong), 401, "UNAUTHENTICATED")
        assert_error(await client.get("/admin/tenants", headers=scraper), 401, "UNAUTHENTICATED")
        assert_error(await client.get("/v1/models", headers=scraper), 401, "UNAUTHENTICATED")
