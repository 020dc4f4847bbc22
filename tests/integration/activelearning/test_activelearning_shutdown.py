"""SIGTERM to a real active-learning process (python -m services.activelearning) while
forwarded feedback is still queued: the process drains it to analytics and experiments
before it exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as pb_grpc
from loraplex.analytics.v1 import analytics_service_pb2 as apb
from services.common.localhost import free_port
from services.common.settings import REPO_ROOT
from services.experiments.library import ABTestingFramework
from tests.integration.activelearning.test_activelearning_service import (
    answer,
    cand,
    lease,
    new_tenant,
    submit,
)

pytestmark = pytest.mark.integration

RATINGS = (5, 4, 2)


async def wait_serving(addr: str, process: subprocess.Popen, timeout: float = 60) -> None:
    async with grpc.aio.insecure_channel(addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(int(timeout / 0.2)):
            assert process.poll() is None, "the service exited while starting"
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{addr} did not become SERVING")


async def test_sigterm_delivers_queued_feedback_forwards(
    al_servers, redis_url, analytics_stub, tmp_path
):
    tenant = new_tenant()
    ab = ABTestingFramework(al_servers.core.redis)
    await ab.create_experiment(
        tenant,
        "tone",
        [{"name": "control", "traffic_weight": 0.5}, {"name": "warm", "traffic_weight": 0.5}],
        primary_metric={"name": "rating", "kind": "mean"},
        start=True,
    )
    units = [f"user-{i}" for i in range(len(RATINGS))]
    variants = [(await ab.assign(tenant, "tone", u)).variant.name for u in units]

    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "METRICS_PORT": "0",
        "ANALYTICS_ADDR": f"127.0.0.1:{al_servers.analytics.port}",
        "EXPERIMENTS_ADDR": f"127.0.0.1:{al_servers.experiments.port}",
        # Nothing is sent on a timer: what is delivered was flushed by the shutdown.
        "FEEDBACK_FLUSH_SECONDS": "3600",
    }
    log = (tmp_path / "activelearning.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.activelearning"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        addr = f"127.0.0.1:{port}"
        await wait_serving(addr, process)
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.ActiveLearningServiceStub(channel)
            candidates = [
                cand(i, 1.0, experiment="tone", variant=v, unit_id=u)
                for i, (u, v) in enumerate(zip(units, variants, strict=True))
            ]
            await submit(stub, tenant, candidates)
            for rating in RATINGS:
                await answer(stub, tenant, await lease(stub, tenant), rating=rating)

        async def analytics_ratings() -> int:
            reply = await analytics_stub.GetAdapterMetrics(
                apb.GetAdapterMetricsRequest(tenant=tenant, adapter="support")
            )
            return reply.metrics.rating_count

        assert await analytics_ratings() == 0, "feedback was sent before the shutdown"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()

    assert await analytics_ratings() == len(RATINGS)
    results = await ab.get_results(tenant, "tone")
    rating = next(m for m in results.metrics if m.metric.name == "rating")
    assert sum(a.n for a in rating.aggregates) == len(RATINGS)
    assert sum(a.sum for a in rating.aggregates) == sum(RATINGS)
