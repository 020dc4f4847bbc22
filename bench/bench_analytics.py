"""Analytics benchmark: RecordBatch ingest and TopAdapters latency.

- Ingest: batches of 1,000 events over 100 adapters into one analytics process (started
  here as `python -m services.analytics`), several batches in flight, each with a fresh
  batch id. Side by side, in the same run and on the same Redis: `redis-benchmark -P 64
  HINCRBY`, the ceiling for unaggregated writes (one command per counter update).
- TopAdapters over 10,000 adapters of one tenant: p50/p99 client-side latency.

Prints a table and writes bench/results/analytics.json. Starts its own redis-server
(no persistence) on a free port; nothing else needs to be running.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.analytics.v1 import analytics_service_pb2 as pb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as pb_grpc
from loraplex.common.v1 import common_pb2
from services.common.localhost import free_port, start_redis_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "analytics.json"
BATCH_EVENTS, INGEST_ADAPTERS, INGEST_BATCHES, IN_FLIGHT = 1_000, 100, 200, 8
TOP_ADAPTERS, TOP_CALLS = 10_000, 200
HINCRBY_N = 2_000_000


def wait_until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError("service did not come up")
        time.sleep(0.1)


def events_bytes(tenant: str, adapters: int, offset: int, rng: np.random.Generator) -> bytes:
    latencies = rng.lognormal(-1.0, 0.6, BATCH_EVENTS)
    events = [
        pb.Event(
            tenant=tenant,
            adapter=common_pb2.AdapterRef(name=f"adapter-{(offset + i) % adapters:05d}", version=1),
            experiment="exp" if i % 2 else "",
            variant="b" if i % 4 == 1 else ("a" if i % 2 else ""),
            request=pb.RequestOutcome(
                status=pb.REQUEST_STATUS_OK if i % 50 else pb.REQUEST_STATUS_UNAVAILABLE,
                latency_seconds=float(latencies[i]),
                time_to_first_token_seconds=float(latencies[i]) / 5,
                prompt_tokens=100 + i % 50,
                completion_tokens=20 + i % 30,
            ),
        )
        for i in range(BATCH_EVENTS)
    ]
    return pb.RecordBatchRequest(events=events).SerializeToString()


async def ingest(channel: grpc.aio.Channel, payloads: list[bytes], prefix: str) -> float:
    """Sends every payload once (each with a fresh batch id); returns events per second."""
    call = channel.unary_unary(
        "/loraplex.analytics.v1.AnalyticsService/RecordBatch",
        request_serializer=None,  # payloads are serialized already
        response_deserializer=pb.RecordBatchResponse.FromString,
    )
    queue = list(enumerate(payloads))
    accepted = 0

    async def worker() -> None:
        nonlocal accepted
        while queue:
            i, events = queue.pop()
            head = pb.RecordBatchRequest(batch_id=f"{prefix}-{i}").SerializeToString()
            reply = await call(head + events)  # concatenated messages merge
            accepted += reply.accepted

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    elapsed = time.perf_counter() - start
    assert accepted == len(payloads) * BATCH_EVENTS, accepted
    return accepted / elapsed


def hincrby_ceiling(port: int) -> float:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-P",
            "64",
            "-n",
            str(HINCRBY_N),
            "-r",
            "100000",
            "-q",
            "HINCRBY",
            "bench:hincrby",
            "f:__rand_int__",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.findall(r"([\d.]+) requests per second", out)
    return float(found[-1])


async def top_latencies(stub, tenant: str, metric: int, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        reply = await stub.TopAdapters(
            pb.TopAdaptersRequest(tenant=tenant, metric=metric, limit=10)
        )
        out.append(time.perf_counter() - start)
        assert len(reply.adapters) == 10
    return out


async def run(port: int, redis_port: int) -> dict:
    rng = np.random.default_rng(0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AnalyticsServiceStub(channel)
        distinct = [events_bytes("bench", INGEST_ADAPTERS, k, rng) for k in range(8)]
        payloads = [distinct[i % len(distinct)] for i in range(INGEST_BATCHES)]
        await ingest(channel, payloads[:16], "warmup")
        events_per_s = await ingest(channel, payloads, "run")
        print(f"ingest: {events_per_s:,.0f} events/s", flush=True)
        r = redis.Redis(port=redis_port)

        def hash_increments() -> int:
            stats = r.info("commandstats")
            return sum(
                stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hincrby", "hincrbyfloat")
            )

        before = hash_increments()
        await ingest(channel, distinct, "count")
        increments_per_batch = (hash_increments() - before) / len(distinct)
        hincrby_per_s = hincrby_ceiling(redis_port)
        print(f"redis-benchmark HINCRBY -P 64: {hincrby_per_s:,.0f}/s", flush=True)

        top_payloads = [
            events_bytes("bench-top", TOP_ADAPTERS, k * BATCH_EVENTS, rng)
            for k in range(TOP_ADAPTERS * 2 // BATCH_EVENTS)
        ]
        await ingest(channel, top_payloads, "top")
        print(f"ingested {TOP_ADAPTERS:,} adapters; timing TopAdapters", flush=True)
        by_requests = await top_latencies(stub, "bench-top", pb.RANK_METRIC_REQUESTS, TOP_CALLS)
        by_p95 = await top_latencies(stub, "bench-top", pb.RANK_METRIC_P95_LATENCY, 20)

    def ms(values: list[float], q: float) -> float:
        return round(float(np.quantile(values, q)) * 1000, 2)

    return {
        "ingest_events_per_second": round(events_per_s),
        "ingest_setup": f"{INGEST_BATCHES} batches x {BATCH_EVENTS} events, "
        f"{INGEST_ADAPTERS} adapters, {IN_FLIGHT} in flight",
        "hash_increments_per_batch": round(increments_per_batch, 1),
        "redis_benchmark_hincrby_P64_per_second": round(hincrby_per_s),
        "top_adapters": TOP_ADAPTERS,
        "top_requests_p50_ms": ms(by_requests, 0.5),
        "top_requests_p99_ms": ms(by_requests, 0.99),
        "top_requests_mean_ms": round(statistics.mean(by_requests) * 1000, 2),
        "top_p95_latency_p50_ms": ms(by_p95, 0.5),
        "top_p95_latency_p99_ms": ms(by_p95, 0.99),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main() -> None:
    redis_port, port = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="loraplex-bench-redis-")
    redis_proc = start_redis_server(redis_port, workdir)
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PORT": str(port),
        "METRICS_PORT": "0",
        "LOG_LEVEL": "warning",
    }
    service = subprocess.Popen([sys.executable, "-m", "services.analytics"], cwd=ROOT, env=env)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        wait_until(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest()).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        )
        redis_version = redis.Redis(port=redis_port).info("server")["redis_version"]
        result = asyncio.run(run(port, redis_port))
        result["redis_version"] = redis_version
    finally:
        service.terminate()
        service.wait(timeout=30)
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    rows = [
        (
            "RecordBatch ingest (1 analytics process)",
            f"{result['ingest_events_per_second']:,} events/s",
        ),
        (
            "  hash increments per 1,000-event batch",
            f"{result['hash_increments_per_batch']:,} (one EVALSHA)",
        ),
        (
            "redis-benchmark -P 64 HINCRBY (same Redis)",
            f"{result['redis_benchmark_hincrby_P64_per_second']:,} commands/s",
        ),
        (
            f"TopAdapters requests, {TOP_ADAPTERS:,} adapters",
            f"p50 {result['top_requests_p50_ms']} ms, p99 {result['top_requests_p99_ms']} ms",
        ),
        (
            f"TopAdapters p95_latency, {TOP_ADAPTERS:,} adapters",
            f"p50 {result['top_p95_latency_p50_ms']} ms, p99 {result['top_p95_latency_p99_ms']} ms",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
