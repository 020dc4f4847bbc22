"""The product spec's example snippets (shared/product/gap-analysis.md: "Integration
Examples" 1 and 3, "Quick Wins" 2), run against the real library objects: a redis-server
of their own, the repo's tiny model and demo adapters.

Adapted only where a snippet needs something from outside itself: the runtime's adapter
manager (demo adapters registered here, under names no other test uses), the tenant of the
tenant-less calls (given to get_analytics / get_compositor), the spec's process-wide
get_analytics() (here: the one object the test made), `model.generate(...)`'s arguments and
Streamlit's `st` (a recorder of what the page would show)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from services import get_analytics, get_compositor
from services.common.errors import InvalidArgument, NotFound
from services.common.localhost import free_port, start_redis_server
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS

pytestmark = pytest.mark.integration

PROMPT = "Customer: Where is my order 4821?\nAgent:"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    proc = start_redis_server(port, str(tmp_path_factory.mktemp("spec-redis")))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def compositor(redis_url, tmp_path_factory):
    settings = InferenceSettings(adapter_store_dir=tmp_path_factory.mktemp("spec-store"))
    with get_compositor(redis_url, settings, tenant="retailer") as compositor:
        yield compositor


@pytest.fixture(scope="module")
async def adapters(compositor) -> list[str]:
    """The runtime's adapter manager: two demo adapters of tenant "retailer"."""
    names = [f"support-{uuid.uuid4().hex[:6]}", f"billing-{uuid.uuid4().hex[:6]}"]
    await compositor.start()  # registering checks the adapters against the model
    for name, demo in zip(names, ("retailer", "bank"), strict=True):
        await compositor.register("retailer", name, DEMO_ADAPTERS / demo)
    return names


@pytest.fixture
def analytics(redis_url):
    with get_analytics(redis_url, tenant=f"dash-{uuid.uuid4().hex[:8]}") as analytics:
        yield analytics


# --- Example 1: Multi-Tenant Runtime with Analytics ----------------------------------------


class MultiTenantRuntime:
    def __init__(self, analytics, compositor):
        self.analytics = analytics  # spec: get_analytics()
        self.compositor = compositor  # spec: get_compositor(self.adapter_manager)

    async def inference(self, request):
        adapter_ids = request["adapter_ids"]
        start_time = time.time()

        # Use real-time composition
        model = self.compositor.compose_sync(adapter_ids)

        # Run inference
        output = model.generate(request["prompt"], max_new_tokens=8, temperature=0)
        latency = (time.time() - start_time) * 1000

        # Record analytics
        for adapter_id in adapter_ids:
            self.analytics.record_request(adapter_id, "retailer", latency, success=True)

        return output


async def test_example_1_runtime_composes_generates_and_records(compositor, adapters, analytics):
    runtime = MultiTenantRuntime(analytics, compositor)
    started = time.time()
    mixed = await runtime.inference({"adapter_ids": adapters, "prompt": PROMPT})
    elapsed_ms = (time.time() - started) * 1000
    single = await runtime.inference({"adapter_ids": adapters[:1], "prompt": PROMPT})

    # The composition served the request: both adapters, half each (cat is exact, so the
    # same mix asked for through the async API writes the same text).
    assert [r.name for r in mixed.adapter.composed_of] == adapters
    assert mixed.generation.completion_tokens == 8
    halves = [(a, 0.5) for a in adapters]
    same = await compositor.generate(
        "retailer", PROMPT, compose=halves, max_new_tokens=8, temperature=0
    )
    assert mixed.generation.text == same.generation.text
    assert single.adapter.name == adapters[0]
    # One request per adapter per inference, counted for tenant "retailer".
    first = analytics.get_adapter_metrics(adapters[0], tenant="retailer")
    second = analytics.get_adapter_metrics(adapters[1], tenant="retailer")
    assert (first.requests, second.requests) == (2, 1)
    assert second.get_success_rate() == 1.0
    assert 0 < second.avg_latency_ms <= elapsed_ms


def test_compose_sync_refuses_what_the_async_api_refuses(compositor, adapters):
    with pytest.raises(InvalidArgument):
        compositor.compose_sync([])
    with pytest.raises(InvalidArgument) as info:
        compositor.compose_sync(adapters, weights=[0.0, 0.0])
    assert info.value.reason == "BAD_COMPOSITION_WEIGHTS"
    with pytest.raises(InvalidArgument) as info:
        compositor.compose_sync(adapters, weights=[1.0])
    assert info.value.reason == "BAD_COMPOSITION_WEIGHTS"
    with pytest.raises(NotFound):
        compositor.compose_sync([adapters[0], "no-such-adapter"])
    with pytest.raises(NotFound):  # another tenant's adapters are not there
        compositor.compose_sync(adapters, tenant="bank")


# --- Example 3: Admin UI Analytics Dashboard ------------------------------------------------


class StreamlitRecorder:
    """`st`: what the page would show."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, str, str]] = []

    def metric(self, label: str, value: str, delta: str) -> None:
        self.metrics.append((label, value, delta))


# adapter -> (successes, failures, latency in ms of each request)
TRAFFIC = {
    "alpha": (4, 0, 100.0),
    "bravo": (3, 1, 250.0),
    "charlie": (1, 1, 40.0),
    "delta": (9, 1, 75.0),
    "echo": (2, 0, 300.0),
    "foxtrot": (1, 3, 10.0),
}


def record_traffic(analytics) -> None:
    for adapter, (ok, failed, latency) in TRAFFIC.items():
        for i in range(ok + failed):
            analytics.record_request(adapter, analytics.tenant, latency, success=i < ok)


def test_example_3_dashboard_shows_the_top_performers(analytics):
    record_traffic(analytics)
    st = StreamlitRecorder()

    # Show top performers
    top = analytics.get_top_adapters(metric="success_rate", limit=5)

    for adapter in top:
        st.metric(
            adapter.adapter_id,
            f"{adapter.get_success_rate():.1%}",
            f"{adapter.avg_latency_ms:.0f}ms",
        )

    # Best success rate first; ties (alpha and echo at 100%) to more requests.
    assert st.metrics == [
        ("alpha", "100.0%", "100ms"),
        ("echo", "100.0%", "300ms"),
        ("delta", "90.0%", "75ms"),
        ("bravo", "75.0%", "250ms"),
        ("charlie", "50.0%", "40ms"),
    ]


def test_tenant_less_calls_need_a_tenant(redis_url):
    with get_analytics(redis_url) as analytics, pytest.raises(InvalidArgument) as info:
        analytics.get_top_adapters(metric="success_rate", limit=5)
    assert info.value.reason == "INVALID_TENANT"


# --- Quick Win 2: Add Analytics Endpoint -----------------------------------------------------


async def test_quick_win_2_analytics_endpoint(analytics):
    record_traffic(analytics)

    def get_analytics():  # the spec's process-wide instance
        return analytics

    router = APIRouter(prefix="/analytics", tags=["analytics"])

    @router.get("/adapters/{adapter_id}")
    async def get_adapter_metrics(adapter_id: str):
        analytics = get_analytics()
        return analytics.get_adapter_metrics(adapter_id)

    app = FastAPI()
    app.include_router(router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://spec") as client:
        reply = await client.get("/analytics/adapters/bravo")
    assert reply.status_code == 200
    body = reply.json()
    assert body["adapter_id"] == "bravo" and body["tenant"] == analytics.tenant
    assert (body["requests"], body["successes"], body["errors"]) == (4, 3, 1)
    assert body["success_rate"] == 0.75
    assert body["avg_latency_ms"] == pytest.approx(250.0)
    assert body["p50_latency_ms"] == pytest.approx(250.0, rel=0.01)  # the sketch's 1 %
