"""Analytics benchmark: RecordBatch ingest and TopAdapters latency.

- Ingest: batches of 1,000 events over 100 adapters, several batches in flight, each with
  a fresh batch id, into one analytics process (`python -m services.analytics`, started
  here) -- the issue's measure -- and then into N processes sharing one port (gRPC sets
  SO_REUSEPORT; the kernel spreads the client's connections over them). Side by side, in
  the same run and on the same Redis: `redis-benchmark -P 64 HINCRBY`, the ceiling for
  unaggregated writes (one command per counter update), and the Redis time the record
  script takes per batch (INFO commandstats).
- TopAdapters over 10,000 adapters of one tenant: p50/p99 client-side latency per metric.
- Redis Cluster (ANALYTICS_BENCH_CLUSTER=0 skips it): one analytics process on a single
  redis-server and one on a Redis Cluster of 3 masters (`redis+cluster://`), the same load
  in interleaved rounds (ingest of batches spread over 8 tenants, then TopAdapters
  p95_latency); medians, and the median of the rounds' cluster / single ratios.

Prints a table and writes bench/results/analytics.json. Starts its own redis-server
(no persistence) on a free port; nothing else needs to be running. Every process shares
the machine: on a 2-core VM, Redis, the analytics processes and this client compete for
the same two cores, so aggregate ingest with N > 1 says more about the cores than about
the service.
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
from services.common.localhost import RedisCluster, free_port, start_redis_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "analytics.json"
BATCH_EVENTS, INGEST_ADAPTERS, INGEST_BATCHES, IN_FLIGHT = 1_000, 100, 200, 8
INGEST_PROCESSES = (1, 2)  # the first is the measure (one analytics process)
TOP_ADAPTERS = 10_000
TOP_CALLS = int(os.environ.get("ANALYTICS_BENCH_TOP_CALLS", "200"))  # per metric
TOP_METRICS = ("requests", "success_rate", "p95_latency")
HINCRBY_N = 2_000_000
# Single redis-server vs Redis Cluster, side by side (ANALYTICS_BENCH_CLUSTER=0 skips it).
CLUSTER = os.environ.get("ANALYTICS_BENCH_CLUSTER", "1") != "0"
CLUSTER_ROUNDS, CLUSTER_BATCHES, CLUSTER_TENANTS, CLUSTER_TOPS = 9, 40, 8, 40


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


def events_bytes(
    tenant: str, adapters: int, offset: int, rng: np.random.Generator, tenants: int = 1
) -> bytes:
    """One batch; with tenants > 1 its events go round-robin to tenant-0, tenant-1, ..."""
    latencies = rng.lognormal(-1.0, 0.6, BATCH_EVENTS)
    events = [
        pb.Event(
            tenant=tenant if tenants == 1 else f"{tenant}-{i % tenants}",
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


async def ingest(channels: list[grpc.aio.Channel], payloads: list[bytes], prefix: str) -> float:
    """Sends every payload once (each with a fresh batch id), IN_FLIGHT at a time, worker i
    on channels[i % len(channels)]; returns events per second."""
    calls = [
        channel.unary_unary(
            "/loraplex.analytics.v1.AnalyticsService/RecordBatch",
            request_serializer=None,  # payloads are serialized already
            response_deserializer=pb.RecordBatchResponse.FromString,
        )
        for channel in channels
    ]
    queue = list(enumerate(payloads))
    accepted = 0

    async def worker(call) -> None:
        nonlocal accepted
        while queue:
            i, events = queue.pop()
            head = pb.RecordBatchRequest(batch_id=f"{prefix}-{i}").SerializeToString()
            reply = await call(head + events)  # concatenated messages merge
            accepted += reply.accepted

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(IN_FLIGHT)))
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


def separate_channels(port: int, n: int) -> list[grpc.aio.Channel]:
    """n channels with a TCP connection each (a local subchannel pool: otherwise channels
    to one target share one connection, and SO_REUSEPORT balances connections)."""
    return [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(n)
    ]


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_services(n: int, port: int, redis_url: str) -> list[subprocess.Popen]:
    """n analytics processes listening on one port, once each answers SERVING."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "METRICS_PORT": "0",
        "LOG_LEVEL": "warning",
    }
    procs = []
    for _ in range(n):
        procs.append(
            subprocess.Popen([sys.executable, "-m", "services.analytics"], cwd=ROOT, env=env)
        )
    # Connections land on any listener; many fresh ones reaching SERVING means every
    # process has bound the port (a process that has not is simply never picked).
    for _ in range(4 * n):
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_until(
                lambda h=health: (
                    h.Check(health_pb2.HealthCheckRequest()).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            )
    time.sleep(0.5)
    return procs


def stop_services(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


async def measure_ingest(
    port: int, redis_pid: int, services: list[subprocess.Popen], r: redis.Redis, tag: str
) -> dict:
    """Ingest into the processes behind `port`: events/s, and the CPU time per batch that
    Redis and the analytics processes used (less noisy than wall time on a shared box)."""
    rng = np.random.default_rng(0)
    distinct = [events_bytes("bench", INGEST_ADAPTERS, k, rng) for k in range(8)]
    payloads = [distinct[i % len(distinct)] for i in range(INGEST_BATCHES)]
    channels = separate_channels(port, IN_FLIGHT)
    try:
        await ingest(channels, payloads[:16], f"{tag}-warmup")
        r.config_resetstat()
        cpu = [cpu_seconds(redis_pid), sum(cpu_seconds(p.pid) for p in services)]
        cpu_client = time.process_time()
        events_per_s = await ingest(channels, payloads, f"{tag}-run")
        cpu_client = time.process_time() - cpu_client
        cpu_redis = cpu_seconds(redis_pid) - cpu[0]
        cpu_service = sum(cpu_seconds(p.pid) for p in services) - cpu[1]
    finally:
        for channel in channels:
            await channel.close()
    stats = r.info("commandstats")
    script = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    calls = {c: stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in _WRITE_COMMANDS}
    return {
        "events_per_second": round(events_per_s),
        "redis_cpu_ms_per_batch": round(cpu_redis * 1000 / INGEST_BATCHES, 2),
        "analytics_cpu_ms_per_batch": round(cpu_service * 1000 / INGEST_BATCHES, 2),
        "client_cpu_ms_per_batch": round(cpu_client * 1000 / INGEST_BATCHES, 2),
        "redis_script_ms_per_batch": round(script["usec"] / max(script["calls"], 1) / 1000, 2),
        "redis_commands_per_batch": {
            c: round(n / max(script["calls"], 1), 1) for c, n in calls.items() if n
        },
    }


_WRITE_COMMANDS = ("hincrby", "hincrbyfloat", "hmget", "hset", "expireat")


async def measure_top(port: int) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        top_payloads = [
            events_bytes("bench-top", TOP_ADAPTERS, k * BATCH_EVENTS, rng)
            for k in range(TOP_ADAPTERS * 2 // BATCH_EVENTS)
        ]
        await ingest([channel], top_payloads, "top")
        print(f"ingested {TOP_ADAPTERS:,} adapters; timing TopAdapters", flush=True)
        stub = pb_grpc.AnalyticsServiceStub(channel)
        for metric in TOP_METRICS:
            number = getattr(pb, f"RANK_METRIC_{metric.upper()}")
            await top_latencies(stub, "bench-top", number, 3)  # warm up
            took = await top_latencies(stub, "bench-top", number, TOP_CALLS)
            out[metric] = {
                "p50_ms": round(float(np.quantile(took, 0.5)) * 1000, 2),
                "p99_ms": round(float(np.quantile(took, 0.99)) * 1000, 2),
                "mean_ms": round(statistics.mean(took) * 1000, 2),
            }
            print(f"TopAdapters {metric}: {out[metric]}", flush=True)
    return out


def main() -> None:
    redis_port = free_port()
    workdir = tempfile.mkdtemp(prefix="loraplex-bench-redis-")
    redis_proc = start_redis_server(redis_port, workdir)
    r = redis.Redis(port=redis_port)
    result: dict = {
        "ingest_setup": f"{INGEST_BATCHES} batches x {BATCH_EVENTS} events, "
        f"{INGEST_ADAPTERS} adapters, {IN_FLIGHT} in flight on {IN_FLIGHT} connections",
        "redis_version": r.info("server")["redis_version"],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ingest": {},
    }
    try:
        for n in INGEST_PROCESSES:
            port = free_port()
            services = start_services(n, port, f"redis://127.0.0.1:{redis_port}/0")
            try:
                found = asyncio.run(measure_ingest(port, redis_proc.pid, services, r, f"n{n}"))
                result["ingest"][f"{n}_processes"] = found
                print(f"ingest, {n} analytics process(es): {found}", flush=True)
                if n == INGEST_PROCESSES[0]:
                    result["ingest_events_per_second"] = found["events_per_second"]
                    result["redis_benchmark_hincrby_P64_per_second"] = round(
                        hincrby_ceiling(redis_port)
                    )
                    print(
                        "redis-benchmark HINCRBY -P 64: "
                        f"{result['redis_benchmark_hincrby_P64_per_second']:,}/s",
                        flush=True,
                    )
                    result["top_adapters"] = TOP_ADAPTERS
                    result["top"] = asyncio.run(measure_top(port))
            finally:
                stop_services(services)
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    one = result["ingest"][f"{INGEST_PROCESSES[0]}_processes"]
    rows = [
        ("RecordBatch ingest, 1 analytics process", f"{one['events_per_second']:,} events/s"),
        (
            "  CPU per 1,000-event batch: analytics, Redis, client",
            f"{one['analytics_cpu_ms_per_batch']} ms, {one['redis_cpu_ms_per_batch']} ms "
            f"(script {one['redis_script_ms_per_batch']} ms wall), "
            f"{one['client_cpu_ms_per_batch']} ms",
        ),
        (
            "  Redis commands per batch (inside the script)",
            ", ".join(f"{c} {n}" for c, n in one["redis_commands_per_batch"].items()),
        ),
    ]
    for n in INGEST_PROCESSES[1:]:
        found = result["ingest"][f"{n}_processes"]
        rows.append(
            (
                f"RecordBatch ingest, {n} processes on one port",
                f"{found['events_per_second']:,} events/s in all (same {os.cpu_count()} cores)",
            )
        )
    rows.append(
        (
            "redis-benchmark -P 64 HINCRBY (same Redis)",
            f"{result['redis_benchmark_hincrby_P64_per_second']:,} commands/s",
        )
    )
    for metric, found in result["top"].items():
        rows.append(
            (
                f"TopAdapters {metric}, {TOP_ADAPTERS:,} adapters",
                f"p50 {found['p50_ms']} ms, p99 {found['p99_ms']} ms",
            )
        )
    width = max(len(row[0]) for row in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if CLUSTER:
        result["cluster_vs_single"] = compare_cluster()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


async def cluster_round(port: int, rng: np.random.Generator, tag: str) -> dict:
    """One round on the analytics process behind `port`: ingest (multi-tenant batches)
    and TopAdapters latency."""
    payloads = [
        events_bytes("bench", INGEST_ADAPTERS, k, rng, tenants=CLUSTER_TENANTS)
        for k in range(CLUSTER_BATCHES)
    ]
    channels = separate_channels(port, IN_FLIGHT)
    try:
        events_per_s = await ingest(channels, payloads, tag)
        stub = pb_grpc.AnalyticsServiceStub(channels[0])
        top = await top_latencies(stub, "bench-top", pb.RANK_METRIC_P95_LATENCY, CLUSTER_TOPS)
    finally:
        for channel in channels:
            await channel.close()
    return {"events_per_second": events_per_s, "top_p95_p50_ms": 1000 * statistics.median(top)}


def compare_cluster() -> dict:
    """The same analytics process and load on a single redis-server and on a Redis Cluster
    of 3 masters, in interleaved rounds (alternating which goes first); medians, and the
    median of the rounds' cluster / single ratios."""
    workdir = tempfile.mkdtemp(prefix="loraplex-bench-cluster-")
    single_port = free_port()
    single = start_redis_server(single_port, workdir)
    cluster = RedisCluster(workdir)
    urls = {"single": f"redis://127.0.0.1:{single_port}/0", "cluster": cluster.url}
    ports = {kind: free_port() for kind in urls}
    services = {kind: start_services(1, ports[kind], url) for kind, url in urls.items()}
    rounds: dict[str, list[dict]] = {kind: [] for kind in urls}
    try:
        rng = np.random.default_rng(2)
        seed = [
            events_bytes("bench-top", TOP_ADAPTERS, k * BATCH_EVENTS, rng)
            for k in range(TOP_ADAPTERS * 2 // BATCH_EVENTS)
        ]
        for kind, port in ports.items():
            asyncio.run(ingest_top_seed(port, seed))
            asyncio.run(cluster_round(port, rng, f"{kind}-warmup"))
        for r in range(CLUSTER_ROUNDS):
            for kind in list(ports)[:: 1 if r % 2 else -1]:
                found = asyncio.run(cluster_round(ports[kind], rng, f"{kind}-{r}"))
                rounds[kind].append(found)
    finally:
        for procs in services.values():
            stop_services(procs)
        cluster.stop()
        single.terminate()
        single.wait(timeout=30)
    out = {
        kind: {m: statistics.median(x[m] for x in found) for m in found[0]}
        for kind, found in rounds.items()
    }
    # Each round's pair ran back to back: the median of their ratios drifts least with the
    # machine's load.
    out["cluster_over_single"] = {
        m: statistics.median(
            c[m] / s[m] for s, c in zip(rounds["single"], rounds["cluster"], strict=True)
        )
        for m in out["single"]
    }
    out["setup"] = (
        f"{CLUSTER_ROUNDS} interleaved rounds; each: {CLUSTER_BATCHES} batches x "
        f"{BATCH_EVENTS} events over {CLUSTER_TENANTS} tenants, {IN_FLIGHT} in flight, then "
        f"{CLUSTER_TOPS} TopAdapters p95_latency over {TOP_ADAPTERS:,} adapters"
    )
    print(f"\nRedis Cluster (3 masters) vs single redis-server: {out['setup']}; medians")
    print(f"{'':<10} {'ingest events/s':>16} {'TopAdapters p50 ms':>19}")
    for kind in ("single", "cluster"):
        got = out[kind]
        print(f"{kind:<10} {got['events_per_second']:>16,.0f} {got['top_p95_p50_ms']:>19.2f}")
    ratio = out["cluster_over_single"]
    print(
        f"{'ratio':<10} {ratio['events_per_second']:>16.2f} {ratio['top_p95_p50_ms']:>19.2f}"
        "   (median of the rounds' cluster / single)"
    )
    return out


async def ingest_top_seed(port: int, payloads: list[bytes]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await ingest([channel], payloads, "top")


if __name__ == "__main__":
    main()
