"""Experiment assignment as the gateway does it, and what experimentation adds to a request.

Part 1, assignment (one process, its own redis-server): BENCH_UNITS distinct unit ids
(20,000), first assignments of an experiment with two variants (50/50, hash v2), the same
inputs for every row, rows run one after another:

- `growthbook`: GrowthBook's own `GrowthBook.run(Experiment(...))` (the `growthbook`
  package), attributes set per unit on one instance, no sticky bucketing;
- `growthbook+sticky`: the same with its InMemoryStickyBucketService;
- `client, in-memory sticky`: services.experiments.client.ExperimentsClient with a dict as
  its StickyStore: the in-process evaluation alone (cached definition, hash, ranges);
- `client, redis sticky`: the client as the gateway runs it, with RedisStickyStore (the
  service's Lua script: sticky write and call counts), one caller at a time;
- `client, redis sticky, 32 callers`: the same with 32 concurrent callers (the calls of
  one event-loop turn share a pipeline).

Part 1b, Redis Cluster (BENCH_CLUSTER=0 skips it): `client, redis sticky` with 1 and 32
callers on a single redis-server and on a Redis Cluster of 3 masters (`redis+cluster://`),
CLUSTER_UNITS new units per row, interleaved rounds (alternating which goes first);
medians of p50 latency and of assignments per second, and the median of the rounds'
cluster / single ratios.

Latencies are per call (perf_counter around each); CPU is this process's (and
redis-server's) per assignment; per core/s = 1 / this process's CPU per assignment. Every
unit's variant is checked against GrowthBook's.

Part 2, end to end (BENCH_E2E=0 skips it): a stack of inference + experiments + gateway
(`python -m services.stack --services inference,experiments` on free ports, its own
redis-server); BENCH_REQUESTS (300) pairs of 1-token completions, one client, interleaved:
by adapter name (`bank-support`) and through `experiment:<key>` whose two variants both
serve `bank-support` (new user each request), so the model's work is the same and the
difference is the cost of experimentation per request (target p50 <= 0.5 ms).

    python -m bench bench_experiments        # or make bench BENCH=bench_experiments

Prints tables and writes bench/results/experiments.json.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
from growthbook import GrowthBook, InMemoryStickyBucketService
from growthbook.common_types import Experiment as GbExperiment

from bench.common import write_json
from services.common.keys import adapter_index
from services.common.localhost import RedisCluster, free_port, start_redis_server
from services.common.redis import connect
from services.experiments.client import ExperimentsClient
from services.experiments.core import ExperimentStore, Update
from services.experiments.model import Experiment, Variant, VariantAdapter
from services.stack import start_on_free_ports

UNITS = int(os.environ.get("BENCH_UNITS", 20_000))
CALLERS = 32
REQUESTS = int(os.environ.get("BENCH_REQUESTS", 300))
E2E = os.environ.get("BENCH_E2E", "1") != "0"
CLUSTER = os.environ.get("BENCH_CLUSTER", "1") != "0"
CLUSTER_UNITS, CLUSTER_ROUNDS = 5_000, 5
TENANT, KEY, WEIGHTS = "bench", "bench", [0.5, 0.5]
TARGET_P50_MS = 0.5


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySticky:
    """A StickyStore in a dict: the client's evaluation without Redis."""

    def __init__(self) -> None:
        self.units: dict[tuple[str, int, str], int] = {}

    async def assign(self, experiment: Experiment, unit_id: str, index: int) -> tuple[int, bool]:
        ident = (experiment.key, experiment.bucket_version, unit_id)
        stored = self.units.get(ident)
        if stored is not None:
            return stored, False
        if index >= 0:
            self.units[ident] = index
        return index, index >= 0


def row(name: str, latencies: list[float], cpu: float, redis_cpu: float = 0.0) -> dict:
    ms = np.array(latencies) * 1000
    n = len(latencies)
    return {
        "target": name,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_us_per_assign": cpu * 1e6 / n,
        "per_core_per_second": n / cpu if cpu else None,
        "redis_cpu_us_per_assign": redis_cpu * 1e6 / n,
    }


def run_growthbook(units: list[str], sticky: bool) -> tuple[list[float], float, list[int]]:
    service = InMemoryStickyBucketService() if sticky else None
    gb = GrowthBook(sticky_bucket_service=service)
    experiment = GbExperiment(key=KEY, variations=[0, 1], weights=WEIGHTS, hashVersion=2)
    latencies, chosen = [], []
    cpu = time.process_time()
    for unit in units:
        started = time.perf_counter()
        gb.set_attributes({"id": unit})
        result = gb.run(experiment)
        latencies.append(time.perf_counter() - started)
        chosen.append(result.variationId if result.inExperiment else -1)
    return latencies, time.process_time() - cpu, chosen


async def run_client(
    client: ExperimentsClient, units: list[str], callers: int = 1
) -> tuple[list[float], float, list[int]]:
    latencies = [0.0] * len(units)
    chosen = [0] * len(units)
    next_unit = 0

    async def caller() -> None:
        nonlocal next_unit
        while next_unit < len(units):
            i = next_unit
            next_unit += 1
            started = time.perf_counter()
            got = await client.assign(TENANT, KEY, units[i])
            latencies[i] = time.perf_counter() - started
            chosen[i] = got.variant_index

    cpu = time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, time.process_time() - cpu, chosen


async def assignment_rows(redis_url: str, redis_pid: int) -> list[dict]:
    redis = connect(redis_url)
    await setup_experiment(redis)
    rows, reference = [], None
    for sticky in (False, True):
        latencies, cpu, chosen = run_growthbook([f"u{i}" for i in range(UNITS)], sticky)
        rows.append(row("growthbook" + ("+sticky" if sticky else ""), latencies, cpu))
        reference = reference or chosen
    targets: list[tuple[str, Callable[[], ExperimentsClient], int]] = [
        ("client, in-memory sticky", lambda: ExperimentsClient(redis, MemorySticky()), 1),
        ("client, redis sticky", lambda: ExperimentsClient(redis), 1),
        (f"client, redis sticky, {CALLERS} callers", lambda: ExperimentsClient(redis), CALLERS),
    ]
    for run, (name, make, callers) in enumerate(targets):
        client = make()
        client.start()
        await client.wait_listening()
        await client.assign(TENANT, KEY, "warm-up")  # the definition is cached from here on
        units = [f"u{i}" if run == 0 else f"r{run}-u{i}" for i in range(UNITS)]
        redis_before = cpu_seconds(redis_pid)
        latencies, cpu, chosen = await run_client(client, units, callers)
        rows.append(row(name, latencies, cpu, cpu_seconds(redis_pid) - redis_before))
        await client.close()
        if run == 0:
            assert chosen == reference, "the client and GrowthBook disagree"
        else:  # new ids per run (first assignments): compare with GrowthBook on those
            assert chosen == run_growthbook(units, False)[2], "disagreement with GrowthBook"
    await redis.aclose()
    return rows


async def setup_experiment(redis) -> None:
    await redis.hset(adapter_index(TENANT), "support", 1)
    store = ExperimentStore(redis)
    variants = tuple(Variant(n, (VariantAdapter("support"),), 0.5) for n in ("a", "b"))
    await store.create(Experiment(KEY, TENANT, variants))
    await store.update(TENANT, KEY, Update(action="start"))


async def cluster_rows(urls: dict[str, str]) -> dict:
    """`client, redis sticky` (1 and CALLERS callers) on each Redis of `urls`, rounds
    interleaved; per kind and callers: medians of p50 ms and assignments/s."""
    clients = {}
    for kind, url in urls.items():
        redis = connect(url)
        await setup_experiment(redis)
        client = ExperimentsClient(redis)
        client.start()
        await client.wait_listening()
        await client.assign(TENANT, KEY, "warm-up")
        clients[kind] = client
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(CLUSTER_ROUNDS):
        for kind in list(clients)[:: 1 if r % 2 else -1]:
            for callers in (1, CALLERS):
                units = [f"c{r}-{callers}-u{i}" for i in range(CLUSTER_UNITS)]
                started = time.perf_counter()
                latencies, _, _ = await run_client(clients[kind], units, callers)
                rate = len(units) / (time.perf_counter() - started)
                p50 = 1000 * statistics.median(latencies)
                samples.setdefault((kind, callers), []).append((p50, rate))
    for client in clients.values():
        await client.close()
        await client.redis.aclose()
    out: dict = {"cluster_over_single": {}}
    for (kind, callers), found in samples.items():
        out.setdefault(kind, {})[f"{callers}_callers"] = {
            "p50_ms": statistics.median(p for p, _ in found),
            "assignments_per_second": statistics.median(x for _, x in found),
        }
    for callers in (1, CALLERS):  # the median of the rounds' ratios (each pair back to back)
        pairs = list(zip(samples[("single", callers)], samples[("cluster", callers)], strict=True))
        out["cluster_over_single"][f"{callers}_callers"] = {
            m: statistics.median(c[i] / s[i] for s, c in pairs)
            for i, m in enumerate(("p50_ms", "assignments_per_second"))
        }
    return out


def print_cluster(found: dict) -> None:
    print(
        f"\nRedis Cluster (3 masters) vs single redis-server: client, redis sticky; "
        f"{CLUSTER_UNITS:,} new units per row, {CLUSTER_ROUNDS} interleaved rounds, medians"
    )
    print(f"{'':<10} {'callers':>8} {'p50 ms':>8} {'assignments/s':>14}")
    for kind in ("single", "cluster", "cluster_over_single"):
        for callers, got in found[kind].items():
            name = "ratio" if kind == "cluster_over_single" else kind
            number = callers.split("_")[0]
            rate = got["assignments_per_second"]
            rate_text = f"{rate:>14.2f}" if name == "ratio" else f"{rate:>14,.0f}"
            print(f"{name:<10} {number:>8} {got['p50_ms']:>8.3f} {rate_text}")


async def end_to_end(redis_url: str, run_dir: Path) -> dict:
    stack = start_on_free_ports(
        run_dir, redis_url, {"LOG_LEVEL": "warning"}, services=("inference", "experiments")
    )
    bank = {"Authorization": f"Bearer {stack.keys['BANK_KEY']}"}
    try:
        async with httpx.AsyncClient(base_url=stack.url, headers=bank, timeout=120) as http:
            same = [{"name": "bank-support"}]
            definition = {
                "key": KEY,
                "variants": [
                    {"name": "a", "traffic_weight": 0.5, "adapters": same},
                    {"name": "b", "traffic_weight": 0.5, "adapters": same},
                ],
            }
            (await http.post("/ab-testing/experiments", json=definition)).raise_for_status()
            start = {"action": "EXPERIMENT_ACTION_START"}
            (await http.patch(f"/ab-testing/experiments/{KEY}", json=start)).raise_for_status()

            async def complete(model: str, user: str) -> float:
                body = {"model": model, "user": user, "prompt": "Hi", "max_tokens": 1}
                started = time.perf_counter()
                reply = await http.post("/v1/completions", json=body)
                reply.raise_for_status()
                assert reply.json()["loraplex"]["adapter"]["name"] == "bank-support"
                return time.perf_counter() - started

            calls: dict[str, Callable[[int], Awaitable[float]]] = {
                "by adapter name": lambda i: complete("bank-support", f"user-{i}"),
                "experiment:<key>": lambda i: complete(f"experiment:{KEY}", f"user-{i}"),
            }
            for i in range(20):  # warm-up
                for call in calls.values():
                    await call(-1 - i)
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for i in range(REQUESTS):  # interleaved, alternating which goes first
                order = list(calls.items()) if i % 2 else list(calls.items())[::-1]
                for name, call in order:
                    samples[name].append(await call(i))
    finally:
        stack.stop()
    out = {name: {"p50_ms": 1000 * statistics.median(s)} for name, s in samples.items()}
    for name, s in samples.items():
        out[name]["p99_ms"] = 1000 * float(np.percentile(s, 99))
    by_name, by_experiment = samples["by adapter name"], samples["experiment:<key>"]
    pairs = [e - a for a, e in zip(by_name, by_experiment, strict=True)]
    out["difference"] = {
        "p50_ms": out["experiment:<key>"]["p50_ms"] - out["by adapter name"]["p50_ms"],
        "median_paired_ms": 1000 * statistics.median(pairs),
    }
    return out


def print_assignment(rows: list[dict]) -> None:
    print(
        f"\nAssignment: {UNITS:,} distinct units per row (first assignments), two variants "
        "50/50, hash v2, the same ids for GrowthBook and the client"
    )
    head = f"{'target':<34} {'p50 ms':>8} {'p99 ms':>8} {'CPU us':>8} {'per core/s':>11}"
    print(head + f" {'redis CPU us':>13}")
    for r in rows:
        print(
            f"{r['target']:<34} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
            f"{r['cpu_us_per_assign']:>8.1f} {r['per_core_per_second']:>11,.0f} "
            f"{r['redis_cpu_us_per_assign']:>13.1f}"
        )


def print_end_to_end(e2e: dict) -> None:
    print(
        f"\nEnd to end: {REQUESTS} interleaved pairs of 1-token completions through the "
        "gateway (inference + experiments), one client"
    )
    for name in ("by adapter name", "experiment:<key>"):
        print(f"{name:<18} p50 {e2e[name]['p50_ms']:8.2f} ms   p99 {e2e[name]['p99_ms']:8.2f} ms")
    diff = e2e["difference"]
    print(
        f"cost of experimentation: p50 difference {diff['p50_ms']:.2f} ms, median of paired "
        f"differences {diff['median_paired_ms']:.2f} ms (target p50 <= {TARGET_P50_MS} ms)"
    )


async def main_async() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}"
        try:
            rows = await assignment_rows(f"{url}/0", redis.pid)
            print_assignment(rows)
            cluster = None
            if CLUSTER:
                redis_cluster = RedisCluster(tmp)
                try:
                    cluster = await cluster_rows(
                        {"single": f"{url}/2", "cluster": redis_cluster.url}
                    )
                finally:
                    redis_cluster.stop()
                print_cluster(cluster)
            e2e = None
            if E2E:
                run_dir = Path(tmp) / "stack"
                run_dir.mkdir()
                e2e = await end_to_end(f"{url}/1", run_dir)
                print_end_to_end(e2e)
        finally:
            redis.terminate()
            redis.wait()
    load = os.getloadavg()[0]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    write_json(
        "experiments",
        {"units": UNITS, "requests": REQUESTS, "load_average": load, "assignment": rows}
        | {"cluster_vs_single": cluster, "end_to_end": e2e},
    )


def main() -> None:
    asyncio.run(main_async())


if __name__ == "__main__":
    main()
