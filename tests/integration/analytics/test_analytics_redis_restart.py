"""Redis killed (kill -9) and restarted in the middle of ingest: what the clients were told
was accepted is exactly what is stored — nothing lost, nothing double counted."""

from __future__ import annotations

import asyncio
import subprocess
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.analytics.v1 import analytics_service_pb2 as pb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as pb_grpc
from loraplex.common.v1 import common_pb2
from services.analytics.app import create_server
from services.analytics.settings import AnalyticsSettings
from services.common.localhost import free_port, start_redis_server
from services.common.redis import connect

pytestmark = pytest.mark.integration

CLIENTS, BATCHES, EVENTS = 4, 12, 250


def start_redis(port: int, workdir: str) -> subprocess.Popen:
    """Append-only file on, so what Redis acknowledged survives kill -9."""
    return start_redis_server(port, workdir, "--appendonly", "yes", "--appendfsync", "everysec")


async def test_acknowledged_equals_stored_across_kill_and_restart(tmp_path):
    port = free_port()
    workdir = str(tmp_path)
    proc = start_redis(port, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    settings = AnalyticsSettings(port=0, redis_url=url, shutdown_grace_seconds=1)
    store = connect(url)
    server, _ = create_server(settings, store)
    await server.start()
    await server.set_ready()
    tenant, at = "restart", time.time() - 30
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    acknowledged: dict[str, int] = {}
    failures = 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AnalyticsServiceStub(channel)

            async def client(c: int) -> None:
                nonlocal failures
                for b in range(BATCHES):
                    batch_id = f"c{c}-b{b}"
                    events = [
                        pb.Event(
                            tenant=tenant,
                            adapter=common_pb2.AdapterRef(name=f"a{(c + i) % 5}"),
                            time=stamp,
                            request=pb.RequestOutcome(
                                status=pb.REQUEST_STATUS_OK, latency_seconds=0.01 * (1 + i % 7)
                            ),
                        )
                        for i in range(EVENTS)
                    ]
                    # Every third batch is sent again after its ack, as when an ack is lost
                    # on the way back and the exporter retries.
                    sends = 2 if b % 3 == 0 else 1
                    while sends:  # the exporter's retry: the same batch id until acked
                        try:
                            reply = await stub.RecordBatch(
                                pb.RecordBatchRequest(batch_id=batch_id, events=events),
                                timeout=10,
                            )
                            if batch_id in acknowledged:
                                assert reply.duplicate
                            acknowledged[batch_id] = reply.accepted
                            sends -= 1
                        except grpc.aio.AioRpcError as err:
                            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                            failures += 1
                            await asyncio.sleep(0.05)

            async def killer() -> None:
                nonlocal proc
                while len(acknowledged) < CLIENTS * 2:
                    await asyncio.sleep(0.001)
                proc.kill()  # SIGKILL, mid-ingest
                proc.wait()
                await asyncio.sleep(0.3)
                proc = await asyncio.to_thread(start_redis, port, workdir)

            await asyncio.gather(killer(), *(client(c) for c in range(CLIENTS)))
            assert failures > 0, "the kill did not interrupt ingest"
            totals = []
            for a in range(5):
                reply = await stub.GetAdapterMetrics(
                    pb.GetAdapterMetricsRequest(
                        tenant=tenant, adapter=f"a{a}", window=Duration(seconds=600)
                    )
                )
                totals.append(reply.metrics.requests)
        assert len(acknowledged) == CLIENTS * BATCHES
        assert sum(totals) == sum(acknowledged.values()) == CLIENTS * BATCHES * EVENTS
    finally:
        await server.stop()
        await store.aclose()
        proc.kill()
        proc.wait()
