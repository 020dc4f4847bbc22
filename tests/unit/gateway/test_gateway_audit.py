"""The audit log: each successful change, by whom, for which tenant; nothing for reads or
refused calls; readable by the admin only, newest first, per tenant."""

from __future__ import annotations

import httpx

from tests.unit.gateway.fake_inference import ADMIN_KEY, NewTenant, assert_error

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def audit(client: httpx.AsyncClient, **params) -> list[dict]:
    response = await client.get("/admin/audit", headers=ADMIN, params=params)
    assert response.status_code == 200, response.text
    return response.json()["entries"]


async def test_changes_are_logged_with_actor_tenant_and_action(client: httpx.AsyncClient) -> None:
    assert (
        await client.post("/admin/tenants", headers=ADMIN, json={"tenant": "acme"})
    ).status_code == 201
    key = await client.post("/admin/tenants/acme/keys", headers=ADMIN, json={"scope": "reviewer"})
    assert key.status_code == 201
    limits = await client.put(
        "/admin/tenants/acme/limits", headers=ADMIN, json={"tokens_per_minute": 5}
    )
    assert limits.status_code == 200
    await client.get("/admin/tenants", headers=ADMIN)  # a read: not logged
    duplicate = await client.post("/admin/tenants", headers=ADMIN, json={"tenant": "acme"})
    assert duplicate.status_code == 409  # refused: not logged

    entries = await audit(client, tenant="acme")
    assert [e["action"] for e in entries] == [
        "PUT /admin/tenants/{tenant}/limits",
        "POST /admin/tenants/{tenant}/keys",
    ]
    assert all(e["actor"] == "admin" and e["tenant"] == "acme" for e in entries)
    assert entries[0]["path"] == "/admin/tenants/acme/limits"
    assert entries[0]["at_ms"] >= entries[1]["at_ms"]
    everything = await audit(client)
    assert any(e["action"] == "POST /admin/tenants" for e in everything)
    # The API key itself is never in the log.
    assert key.json()["api_key"] not in str(everything)


async def test_only_the_admin_reads_the_audit_log(
    client: httpx.AsyncClient, new_tenant: NewTenant
) -> None:
    bank = await new_tenant("bank")
    assert_error(await client.get("/admin/audit", headers=bank), 401, "UNAUTHENTICATED")
