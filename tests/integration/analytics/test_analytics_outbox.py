"""The gateway's analytics outbox against the real analytics service: completions served
while analytics is down for longer than the exporter's whole retry budget are all counted,
exactly once, when it is back; and a gateway that died with a batch in flight has it
counted once by its successor."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from google.protobuf.duration_pb2 import Duration

from gateway.app import create_app
from gateway.keys import TenantKeyStore
from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from loraplex.common.v1.common_pb2 import AdapterRef
from services.analytics.app import create_server
from services.analytics.settings import AnalyticsSettings
from services.common.analytics_exporter import (
    AnalyticsExporter,
    analytics_outbox,
    completion_event,
)
from services.common.channels import open_channel
from services.common.localhost import free_port
from services.common.redis import connect
from services.common.server import Server
from tests.helpers import eventually, new_tenant
from tests.unit.gateway.fake_inference import BASE_MODEL, gateway_settings, serve_fake_inference

pytestmark = pytest.mark.integration


async def start_analytics(port: int, redis_url: str) -> Server:
    """The real analytics service on a fixed port (a restart comes back where it was)."""
    settings = AnalyticsSettings(port=port, redis_url=redis_url, shutdown_grace_seconds=0)
    server, _ = create_server(settings, connect(redis_url))
    await server.start()
    await server.set_ready()
    return server


async def counted(stub: apb_grpc.AnalyticsServiceStub, tenant: str, adapter: str) -> int:
    request = apb.GetAdapterMetricsRequest(
        tenant=tenant, adapter=adapter, window=Duration(seconds=3600)
    )
    # wait_for_ready: the channel may still be backing off from the outage.
    reply = await stub.GetAdapterMetrics(request, timeout=10, wait_for_ready=True)
    return reply.metrics.successes


async def test_completions_served_while_analytics_is_down_are_all_counted(
    test_redis_url, redis_client
):
    port = free_port()
    analytics = await start_analytics(port, test_redis_url)
    tenant, keys = new_tenant(), TenantKeyStore(redis_client)
    await keys.create_tenant(tenant)
    headers = {"Authorization": f"Bearer {(await keys.create_key(tenant)).api_key}"}
    async with serve_fake_inference() as inference:
        channels = [open_channel(inference.addr), open_channel(f"127.0.0.1:{port}")]
        app = create_app(
            gateway_settings(inference.addr),
            redis=redis_client,
            inference_channel=channels[0],
            analytics_channel=channels[1],
        )
        exporter = app.state.gateway.exporter
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        served = 0
        stop = asyncio.Event()

        async def client_loop(client: httpx.AsyncClient) -> None:
            nonlocal served
            body = {"model": BASE_MODEL, "prompt": "Hi", "max_tokens": 4}
            while not stop.is_set():
                reply = await client.post("/v1/completions", json=body, headers=headers)
                assert reply.status_code == 200, reply.text
                served += 1
                await asyncio.sleep(0.02)

        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
        ):
            load = [asyncio.create_task(client_loop(client)) for _ in range(3)]
            assert await eventually(lambda: served >= 20)
            await analytics.stop()
            # Down until the exporter has given up on a batch twice: longer than its
            # whole retry budget (where the in-memory exporter dropped the batch).
            assert await eventually(lambda: exporter.exhausted >= 2, timeout=60)
            during = served
            analytics = await start_analytics(port, test_redis_url)
            assert await eventually(lambda: served >= during + 20)
            stop.set()
            await asyncio.gather(*load)
            stub = apb_grpc.AnalyticsServiceStub(channels[1])
            # Sent while the gateway lives: every acknowledged completion, once.

            async def all_counted() -> bool:
                return await counted(stub, tenant, BASE_MODEL) >= served

            await eventually(all_counted, timeout=30)
            assert await counted(stub, tenant, BASE_MODEL) == served
            assert exporter.dropped == 0
        await analytics.stop()
        for channel in channels:
            await channel.close()


async def test_a_batch_sent_by_a_gateway_that_died_before_its_ack_is_counted_once(
    test_redis_url, redis_client
):
    analytics = await start_analytics(0, test_redis_url)
    channel = open_channel(f"127.0.0.1:{analytics.port}")
    tenant = new_tenant()
    box = analytics_outbox(redis_client, f"test-{tenant}", 100)
    events = [completion_event(tenant, AdapterRef(name="support"), 0.1) for _ in range(5)]
    await box.add(events)
    # The first run read a batch, analytics recorded it, and the run died before its ack.
    batch = await box.take(100)
    assert batch is not None
    stub = apb_grpc.AnalyticsServiceStub(channel)
    request = apb.RecordBatchRequest(batch_id=batch.batch_id, events=batch.items)
    assert (await stub.RecordBatch(request, timeout=5)).accepted == 5
    # The next run (same instance name) sends it again: analytics knows the batch id.
    restarted = AnalyticsExporter(channel, outbox=box)
    await restarted.flush()
    assert await redis_client.xlen(box.key) == 0
    assert await counted(stub, tenant, "support") == 5
    await channel.close()
    await analytics.stop()
