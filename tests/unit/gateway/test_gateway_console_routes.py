"""What the console needs from the gateway: /whoami, the admin key acting for the tenant the
X-Loraplex-Tenant header names, the tenant's adapter list, and analytics time series."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.gateway.fake_inference import (
    ADMIN_KEY,
    BASE_MODEL,
    FakeInference,
    NewTenant,
    adapter_info,
    assert_error,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_whoami_names_each_keys_scope_and_tenant(
    client: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    bank = await new_tenant("bank")
    assert (await client.get("/whoami", headers=bank)).json() == {
        "scope": "tenant",
        "tenant": "bank",
    }
    assert (await client.get("/whoami", headers=ADMIN)).json() == {"scope": "admin", "tenant": ""}
    for scope in ("reviewer", "metrics"):
        path = "/admin/metrics-keys" if scope == "metrics" else "/admin/tenants/bank/keys"
        issued = (await client.post(path, headers=ADMIN, json={"scope": scope})).json()
        reply = await client.get(
            "/whoami", headers={"Authorization": f"Bearer {issued['api_key']}"}
        )
        tenant = "" if scope == "metrics" else "bank"
        assert reply.json() == {"scope": scope, "tenant": tenant}
    assert_error(await client.get("/whoami"), 401, "UNAUTHENTICATED")
    bad = {"Authorization": "Bearer lpx_nope"}
    assert_error(await client.get("/whoami", headers=bad), 401, "UNAUTHENTICATED")


async def test_the_admin_key_acts_for_the_tenant_it_names(
    client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference
) -> None:
    await new_tenant("bank")
    await new_tenant("shop")
    fake.adapters += [adapter_info("bank", "fraud"), adapter_info("shop", "returns")]
    as_bank = {**ADMIN, "X-Loraplex-Tenant": "bank"}
    models = await client.get("/v1/models", headers=as_bank)
    assert models.status_code == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == [BASE_MODEL, "fraud"]
    assert fake.requests["ListAdapters"][-1].tenant == "bank"
    # Without the header the admin key is no tenant's; an unknown tenant is a 404.
    error = assert_error(await client.get("/v1/models", headers=ADMIN), 400, "INVALID_ARGUMENT")
    assert error["details"][0]["reason"] == "TENANT_REQUIRED"
    nobody = {**ADMIN, "X-Loraplex-Tenant": "nobody"}
    assert_error(await client.get("/v1/models", headers=nobody), 404, "NOT_FOUND")
    # The header gives a tenant key nothing: a key always acts for its own tenant.
    shop = await client.post("/admin/tenants/shop/keys", headers=ADMIN)
    shop_key = {"Authorization": f"Bearer {shop.json()['api_key']}", "X-Loraplex-Tenant": "bank"}
    listed = await client.get("/v1/models", headers=shop_key)
    assert [m["id"] for m in listed.json()["data"]] == [BASE_MODEL, "returns"]


async def test_adapters_lists_the_callers_serving_versions_and_shared_ones(
    client: httpx.AsyncClient, new_tenant: NewTenant, fake: FakeInference
) -> None:
    bank = await new_tenant("bank")
    fake.adapters += [
        adapter_info("bank", "fraud", version=3),
        adapter_info("shop", "returns"),
        adapter_info("bank", "faq", version=1),
        adapter_info("", "common", shared=True),
    ]
    reply = await client.get("/composition/adapters", headers=bank)
    assert reply.status_code == 200, reply.text
    listed = [(a["name"], a["version"], a.get("shared", False)) for a in reply.json()["adapters"]]
    assert listed == [("fraud", 3, False), ("faq", 1, False), ("common", 1, True)]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"window": "1w"}, "BAD_WINDOW"),
        ({"resolution": "second"}, "BAD_RESOLUTION"),
    ],
)
async def test_timeseries_parameters_are_checked(
    client: httpx.AsyncClient, new_tenant: NewTenant, params: dict, reason: str
) -> None:
    headers = await new_tenant("bank")
    reply = await client.get("/analytics/adapters/fraud/timeseries", headers=headers, params=params)
    assert assert_error(reply, 400, "INVALID_ARGUMENT")["details"][0]["reason"] == reason


async def test_a_version_filter_must_be_a_version(
    client: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    headers = await new_tenant("bank")
    for path in ("/analytics/adapters/fraud", "/analytics/adapters/fraud/timeseries"):
        reply = await client.get(path, headers=headers, params={"version": 0})
        assert reply.status_code == 400, reply.text
    # Past validation: this gateway has no analytics service.
    reply = await client.get(
        "/analytics/adapters/fraud/timeseries", headers=headers, params={"version": 2}
    )
    assert assert_error(reply, 503, "UNAVAILABLE")["details"][0]["reason"] == "ANALYTICS_DISABLED"
