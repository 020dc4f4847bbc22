"""/analytics routes: parameter checks and what happens without an analytics service.
(Counts through the real services are checked end to end in tests/e2e.)"""

from __future__ import annotations

import httpx
import pytest

from gateway.analytics_routes import parse_window
from services.common.errors import InvalidArgument
from tests.unit.gateway.fake_inference import NewTenant, assert_error


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("7d", 604800)]
)
def test_windows(text, seconds):
    assert parse_window(text).seconds == seconds


@pytest.mark.parametrize("text", ["", "0h", "1w", "h", "-1h", "1.5h", "1 h"])
def test_bad_windows(text):
    with pytest.raises(InvalidArgument):
        parse_window(text)


async def test_analytics_needs_a_key(client: httpx.AsyncClient):
    assert_error(await client.get("/analytics/adapters/x"), 401, "UNAUTHENTICATED")


async def test_without_an_analytics_service_the_routes_answer_503(
    client: httpx.AsyncClient, new_tenant: NewTenant
):
    headers = await new_tenant("bank")
    error = assert_error(
        await client.get("/analytics/adapters/fraud", headers=headers), 503, "UNAVAILABLE"
    )
    assert error["details"][0]["reason"] == "ANALYTICS_DISABLED"


@pytest.mark.parametrize(
    "params", [{"metric": "vibes"}, {"window": "forever"}, {"limit": 0}, {"limit": 5000}]
)
async def test_bad_top_performer_parameters_are_400(
    client: httpx.AsyncClient, new_tenant: NewTenant, params
):
    headers = await new_tenant("bank")
    response = await client.get("/analytics/top-performers", params=params, headers=headers)
    assert_error(response, 400, "INVALID_ARGUMENT")
