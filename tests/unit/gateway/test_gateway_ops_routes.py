"""Probes, metrics, and the error body of failures that are not the services' doing."""

from __future__ import annotations

import grpc
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from services.common.localhost import free_port
from services.common.redis import connect
from tests.unit.gateway.fake_inference import (
    ADMIN_KEY,
    FakeInferenceServer,
    NewTenant,
    assert_error,
    gateway_settings,
)

# /metrics needs the admin key or a metrics-scope key.
SCRAPER = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_follows_inference_health(
    client: httpx.AsyncClient, inference: FakeInferenceServer
) -> None:
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"redis": "ok", "inference": "ok"}

    await inference.set_serving(False)
    not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"] == {"redis": "ok", "inference": "NOT_SERVING"}

    await inference.set_serving(True)
    assert (await client.get("/readyz")).status_code == 200


async def test_readyz_when_inference_is_down(
    client: httpx.AsyncClient, inference: FakeInferenceServer
) -> None:
    await inference.server.grpc.stop(None)
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["inference"] == "UNAVAILABLE"


async def test_readyz_when_redis_is_down(
    inference: FakeInferenceServer, channel: grpc.aio.Channel
) -> None:
    dead_redis = connect(f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(gateway_settings(inference.addr), redis=dead_redis, inference_channel=channel)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/readyz")
    await dead_redis.aclose()
    assert response.status_code == 503
    assert response.json()["checks"] == {"redis": "unreachable", "inference": "ok"}


def counter(metrics_text: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "loraplex_http_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels == labels:
                    return sample.value
    return 0.0


async def test_metrics_count_requests_by_route_template(
    client: httpx.AsyncClient, admin: dict[str, str], new_tenant: NewTenant
) -> None:
    await new_tenant("bank")
    labels = {"method": "POST", "route": "/admin/tenants/{tenant}/keys", "status": "201"}
    before = counter((await client.get("/metrics", headers=SCRAPER)).text, **labels)

    assert (await client.post("/admin/tenants/bank/keys", headers=admin)).status_code == 201
    after_text = (await client.get("/metrics", headers=SCRAPER)).text

    assert counter(after_text, **labels) == before + 1
    assert "/admin/tenants/bank/keys" not in after_text  # never the raw path
    assert "loraplex_http_request_duration_seconds_bucket" in after_text


async def test_unknown_route_is_404_with_error_body(client: httpx.AsyncClient) -> None:
    before = counter(
        (await client.get("/metrics", headers=SCRAPER)).text,
        method="GET",
        route="unmatched",
        status="404",
    )
    response = await client.get("/v2/nothing-here")
    assert_error(response, 404, "NOT_FOUND")
    after = counter(
        (await client.get("/metrics", headers=SCRAPER)).text,
        method="GET",
        route="unmatched",
        status="404",
    )
    assert after == before + 1


async def test_wrong_method_is_405_with_error_body(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/completions"), 405, "UNIMPLEMENTED")


async def test_crash_is_a_generic_500(
    app: FastAPI,
    client: httpx.AsyncClient,
    new_tenant: NewTenant,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bank = await new_tenant("bank")

    async def broken(api_key: str) -> str:
        raise RuntimeError("secret internals at 10.0.0.7")

    monkeypatch.setattr(app.state.gateway.keys, "resolve", broken)
    response = await client.get("/v1/models", headers=bank)
    error = assert_error(response, 500, "INTERNAL")
    assert error["message"] == "internal error"
    assert "10.0.0.7" not in response.text
    assert "secret internals" in caplog.text  # the traceback is logged instead
    metrics = (await client.get("/metrics", headers=SCRAPER)).text
    assert counter(metrics, method="GET", route="/v1/models", status="500") >= 1
