"""Assign over gRPC: 1,000,000 distinct unit ids, 32 concurrent callers, one server process.

Each target runs as its own child process, measured one after another in the same run:

- `noop`: the same server machinery (services.common.server.Server: grpc.aio, health,
  reflection, the error/metrics interceptor) answering Assign with a constant reply — the
  floor of any Assign on this machine;
- `noop-sync`: a plain synchronous grpc server (thread pool) answering the same constant,
  to compare the two gRPC server models;
- `service`: `python -m services.experiments` (grpc.aio, the default) with its own
  redis-server;
- `service-sync`: the same with `SERVER_MODE=sync` (thread-pool gRPC server);
- `before` (when BENCH_COMPARE_TREE names another checkout): the same service from there.

The experiment's 1,000,000 unit ids are all distinct. By default the first 950,000 are
written straight into Redis (sticky assignment, unit counts, as Assign writes them) and the
last 50,000 are timed over gRPC, so each timed call is a first assignment into a sticky map
of ~1,000,000 units — what the millionth user meets — in under a minute per target.
BENCH_TIMED=1000000 drives all of them over gRPC (~8-12 minutes per target on 2 cores).

    python -m bench.bench_experiments
    BENCH_TIMED=1000000 BENCH_TARGETS=noop,service python -m bench.bench_experiments

Env: BENCH_UNITS (1,000,000), BENCH_TIMED (50,000), BENCH_CALLERS (32), BENCH_TARGETS
(noop,noop-sync,service,service-sync[,before]), BENCH_COMPARE_TREE, BENCH_SYNC_THREADS (4).
Prints a table and writes
bench/results/experiments.json.
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
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.experiments.v1 import experiments_service_pb2 as pb
from loraplex.experiments.v1 import experiments_service_pb2_grpc as pb_grpc
from services.common.keys import adapter_index
from services.common.localhost import free_port, start_redis_server
from services.experiments import assignment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
UNITS = int(os.environ.get("BENCH_UNITS", 1_000_000))
TIMED = min(int(os.environ.get("BENCH_TIMED", 50_000)), UNITS)
CALLERS = int(os.environ.get("BENCH_CALLERS", 32))
COMPARE_TREE = os.environ.get("BENCH_COMPARE_TREE", "")
TARGETS = os.environ.get(
    "BENCH_TARGETS", "noop,noop-sync,service,service-sync" + (",before" if COMPARE_TREE else "")
).split(",")
SYNC_THREADS = int(os.environ.get("BENCH_SYNC_THREADS", 4))
CHANNELS = 4  # callers share a few HTTP/2 connections, as a gateway's pool would
TENANT = "bench"
KEY = "bench"
VARIANTS = [
    pb.Variant(name="control", traffic_weight=0.5, adapters=[pb.VariantAdapter(name="support")]),
    pb.Variant(
        name="treatment", traffic_weight=0.5, adapters=[pb.VariantAdapter(name="support-v2")]
    ),
]
NOOP_REPLY = pb.AssignResponse(
    in_experiment=True, variant_index=1, variant=VARIANTS[1], bucket=0.5, bucket_version=1
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the no-op servers (run as `python -m bench.bench_experiments --noop aio|sync PORT`) ------


class _AioNoop(pb_grpc.ExperimentsServiceServicer):
    async def Assign(self, request, context):
        return NOOP_REPLY


class _SyncNoop(pb_grpc.ExperimentsServiceServicer):
    def Assign(self, request, context):
        return NOOP_REPLY


async def _serve_aio_noop(port: int) -> None:
    from services.common.server import Server, ServiceSpec, run_until_signal
    from services.experiments.servicer import SERVICE_NAME
    from services.experiments.settings import ExperimentsSettings

    settings = ExperimentsSettings(port=port, metrics_port=0, shutdown_grace_seconds=0)
    server = Server(
        settings,
        [ServiceSpec(SERVICE_NAME, _AioNoop(), pb_grpc.add_ExperimentsServiceServicer_to_server)],
    )
    await server.start()
    await server.set_ready()
    await run_until_signal(server)


def _serve_sync_noop(port: int) -> None:
    import signal

    from grpc_health.v1 import health

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SYNC_THREADS))
    pb_grpc.add_ExperimentsServiceServicer_to_server(_SyncNoop(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


# -- targets --------------------------------------------------------------------------------


def wait_serving(proc: subprocess.Popen, addr: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with grpc.insecure_channel(addr) as chan:
            try:
                status = health_pb2_grpc.HealthStub(chan).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{proc.args} did not become ready")


def start_target(name: str, redis_url: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "METRICS_PORT": "0", "LOG_LEVEL": "warning"}
    env.pop("ANALYTICS_ADDR", None)
    cwd = ROOT
    if name in ("noop", "noop-sync"):
        mode = "aio" if name == "noop" else "sync"
        args = [sys.executable, "-m", "bench.bench_experiments", "--noop", mode, str(port)]
    else:
        env["REDIS_URL"] = redis_url or ""
        args = [sys.executable, "-m", "services.experiments"]
        env["SERVER_MODE"] = "sync" if name == "service-sync" else "aio"
        env["SYNC_THREADS"] = str(SYNC_THREADS)
        if name == "before":
            cwd = Path(COMPARE_TREE)
    proc = subprocess.Popen(args, env=env, cwd=cwd)
    addr = f"127.0.0.1:{port}"
    wait_serving(proc, addr)
    return proc, addr


def preload(client: redis.Redis, count: int) -> None:
    """Units u0 .. u{count-1} as Assign would have stored them (each assigned once)."""
    prefix = f"lp:{{{TENANT}}}:experiment:{KEY}"
    per_variant = [0, 0]
    chunk = 20_000
    for start in range(0, count, chunk):
        ids = [f"u{i}" for i in range(start, min(start + chunk, count))]
        sticky = {}
        for uid in ids:
            index = assignment.assign(uid, KEY, 2, [0.5, 0.5]).variant_index
            sticky[uid] = index
            per_variant[index] += 1
        pipe = client.pipeline(transaction=False)
        pipe.hset(f"{prefix}:sticky:1", mapping=sticky)
        pipe.hset(f"{prefix}:calls:1", mapping=dict.fromkeys(ids, 1))
        pipe.execute()
    units = {}
    for i, n in enumerate(per_variant):
        units |= {str(i): n, f"{i}:a": n, f"{i}:a2": n}
    client.hset(f"{prefix}:units:1", mapping=units)


async def create_experiment(addr: str) -> None:
    async with grpc.aio.insecure_channel(addr) as chan:
        stub = pb_grpc.ExperimentsServiceStub(chan)
        await stub.CreateExperiment(
            pb.CreateExperimentRequest(
                tenant=TENANT, experiment=pb.Experiment(key=KEY, variants=VARIANTS)
            )
        )
        await stub.UpdateExperiment(
            pb.UpdateExperimentRequest(tenant=TENANT, key=KEY, action=pb.EXPERIMENT_ACTION_START)
        )


async def drive(addr: str, first: int, count: int) -> tuple[float, np.ndarray, int]:
    channels = [grpc.aio.insecure_channel(addr) for _ in range(CHANNELS)]
    stubs = [pb_grpc.ExperimentsServiceStub(c) for c in channels]
    latencies = np.zeros(count)
    in_treatment = 0
    next_unit = 0

    async def caller(k: int) -> None:
        nonlocal next_unit, in_treatment
        stub = stubs[k % CHANNELS]
        while next_unit < count:
            i = next_unit
            next_unit += 1
            request = pb.AssignRequest(tenant=TENANT, experiment_key=KEY, unit_id=f"u{first + i}")
            start = time.perf_counter()
            reply = await stub.Assign(request)
            latencies[i] = time.perf_counter() - start
            in_treatment += reply.variant_index == 1

    for stub in stubs:  # connect every channel before the clock starts
        await stub.Assign(pb.AssignRequest(tenant=TENANT, experiment_key=KEY, unit_id="warm-up"))
    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    elapsed = time.perf_counter() - started
    for c in channels:
        await c.close()
    return elapsed, latencies, in_treatment


def run_target(name: str) -> dict:
    redis_proc = None
    url = None
    client = None
    preloaded = 0
    if name not in ("noop", "noop-sync"):
        port = free_port()
        redis_proc = start_redis_server(port, tempfile.mkdtemp(prefix="bench-redis-"))
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        client.hset(adapter_index(TENANT), mapping={"support": 1, "support-v2": 1})
    proc, addr = start_target(name, url)
    try:
        if client is not None:
            asyncio.run(create_experiment(addr))
            preloaded = UNITS - TIMED
            preload(client, preloaded)
        cpu_before = cpu_seconds(proc.pid)
        redis_before = cpu_seconds(redis_proc.pid) if redis_proc else 0.0
        me_before = time.process_time()
        elapsed, lat, treated = asyncio.run(drive(addr, UNITS - TIMED, TIMED))
        client_cpu = time.process_time() - me_before
        server_cpu = cpu_seconds(proc.pid) - cpu_before
        redis_cpu = cpu_seconds(redis_proc.pid) - redis_before if redis_proc else 0.0
        sticky = client.hlen(f"lp:{{{TENANT}}}:experiment:{KEY}:sticky:1") if client else 0
    finally:
        proc.terminate()
        proc.wait(15)
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait(15)
    ms = lat * 1000
    return {
        "target": name,
        "timed_calls": TIMED,
        "preloaded_units": preloaded,
        "sticky_entries_after": sticky,
        "seconds": round(elapsed, 3),
        "assignments_per_second": round(TIMED / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "treatment_share": round(treated / TIMED, 4) if name not in ("noop", "noop-sync") else None,
        # The load generator shares the machine; the server's CPU per call gives its
        # capacity per core whatever else runs.
        "server_cpu_ms_per_assign": round(server_cpu * 1000 / TIMED, 3),
        "server_capacity_per_core": round(TIMED / server_cpu) if server_cpu else None,
        "redis_cpu_ms_per_assign": round(redis_cpu * 1000 / TIMED, 3),
        "client_cpu_ms_per_assign": round(client_cpu * 1000 / TIMED, 3),
    }


COLUMNS = (
    ("target", "target", "{}"),
    ("assignments_per_second", "assign/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p90_ms", "p90 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("server_cpu_ms_per_assign", "server CPU ms", "{:.3f}"),
    ("server_capacity_per_core", "per core/s", "{}"),
    ("redis_cpu_ms_per_assign", "redis CPU ms", "{:.3f}"),
    ("client_cpu_ms_per_assign", "client CPU ms", "{:.3f}"),
)


def table(rows: list[dict]) -> str:
    cells = [[label for _, label, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[name]) for name, _, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = []
    for r in cells:
        padded = [
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(padded))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    rows = []
    for name in TARGETS:
        print(f"  running {name} ...", flush=True)
        rows.append(run_target(name))
    print(
        f"\nAssign over gRPC: {UNITS:,} distinct unit ids ({UNITS - TIMED:,} preloaded into "
        f"Redis, {TIMED:,} timed over gRPC), {CALLERS} concurrent callers, {CHANNELS} channels"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; targets: >= 3,000 assign/s per process, p99 <= 5 ms\n"
    )
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "units": UNITS,
        "timed": TIMED,
        "callers": CALLERS,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}",
        "targets": {"assignments_per_second": ">= 3000", "p99_ms": "<= 5"},
        "results": rows,
    }
    (RESULTS / "experiments.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--noop":
        if sys.argv[2] == "aio":
            asyncio.run(_serve_aio_noop(int(sys.argv[3])))
        else:
            _serve_sync_noop(int(sys.argv[3]))
    else:
        main()
