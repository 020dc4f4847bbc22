"""Routing across inference replicas: adapter affinity against round-robin.

Two real inference replicas (`python -m services.inference` subprocesses on free ports, the
default tiny model, one Redis, one adapter store), each with an adapter cache budget of 32
adapters; 200 real PEFT adapters with random factors (ranks 8-16); streamed generations of
4 tokens whose adapters follow Zipf(1.1), 8 at a time, sent through the gateway's router
(gateway/replicas.py, in this process). Each round runs every policy (affinity with the
gateway's defaults, affinity with routing_load_floor 8, round-robin) on the same request
sequence, in rotating order, from emptied caches; the table gives the medians over rounds,
next to what an LRU cache of 32 adapters per replica would hit on the same sequences
(simulated: with perfect affinity, and with round-robin). Then one more affinity run in
which one replica is killed (SIGKILL) a third of the way through: every request that had
not started streaming must still succeed (it is retried on the other replica). Writes
bench/results/routing.json.

    python -m bench bench_routing            # defaults: 3 rounds of 1,000 requests
    python -m bench.bench_routing --rounds 5 --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file

from bench.bench_cache import zipf_sequence
from bench.common import make_adapters, write_json
from gateway.replicas import InferenceReplicas, ReplicaSource, rendezvous_rank
from gateway.settings import GatewaySettings
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.channels import open_channel
from services.common.localhost import free_port, start_redis_server
from services.common.settings import REPO_ROOT
from services.inference.settings import InferenceSettings
from services.stack import grpc_serving

REPLICAS, ADAPTERS, CACHED, ZIPF_S, CONCURRENCY, TOKENS = 2, 200, 32, 1.1, 8, 4
TENANT = "bench"
# name -> (routing, ε of bounded load, load floor): the gateway's defaults, with a floor
# of 8 (at 8 requests in flight: affinity without spilling), the baseline.
_DEFAULTS = GatewaySettings.model_fields
POLICIES = {
    "affinity": (
        "affinity",
        _DEFAULTS["routing_load_factor"].default,
        _DEFAULTS["routing_load_floor"].default,
    ),
    "affinity_floor8": ("affinity", _DEFAULTS["routing_load_factor"].default, 8),
    "round_robin": ("round_robin", 0.0, 0),
}


def start_replica(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "a")  # noqa: SIM115 - handed to the child, closed with the run
    return subprocess.Popen(
        [sys.executable, "-m", "services.inference"],
        cwd=REPO_ROOT,
        env={**env, "PORT": str(port)},
        stdout=out,
        stderr=out,
    )


def wait_serving(addresses: list[str], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 300
    while not all(grpc_serving(a) for a in addresses):
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            raise RuntimeError("an inference replica did not start (see its log)")
        time.sleep(0.3)


def request(index: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        tenant=TENANT,
        adapter=common_pb2.AdapterRef(name=f"a{index}"),
        prompt="Customer: Where is my order?\nAgent:",
        params=pb.SamplingParams(max_new_tokens=TOKENS, temperature=0.0),
    )


async def empty_caches(router: InferenceReplicas) -> None:
    for _, stats in await router.each("CacheStats", pb.CacheStatsRequest()):
        for cached in stats.adapters:
            ref = common_pb2.AdapterRef(name=cached.name, version=cached.version)
            await router.UnloadAdapter(pb.UnloadAdapterRequest(tenant=cached.tenant, adapter=ref))


async def cache_counts(router: InferenceReplicas) -> tuple[int, int]:
    stats = await router.CacheStats(pb.CacheStatsRequest())
    return stats.hits, stats.misses


async def run_load(router: InferenceReplicas, sequence: list[int], kill=None) -> dict:
    """Streams every request of `sequence`, CONCURRENCY at a time. `kill` (a callable) runs
    once a third of the requests have finished."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in sequence:
        queue.put_nowait(index)
    done = 0
    lost_before_start, lost_mid_stream = 0, 0
    killed = asyncio.Event()

    async def worker() -> None:
        nonlocal done, lost_before_start, lost_mid_stream
        while not queue.empty():
            index = queue.get_nowait()
            started = False
            try:
                async for _ in router.GenerateStream(request(index), timeout=120):
                    started = True
            except Exception:  # counted: what a client would have seen fail
                if started:
                    lost_mid_stream += 1
                else:
                    lost_before_start += 1
            done += 1
            if kill is not None and done >= len(sequence) // 3 and not killed.is_set():
                killed.set()
                kill()

    hits0, misses0 = await cache_counts(router)
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - began
    hits, misses = await cache_counts(router)
    hits, misses = hits - hits0, misses - misses0
    return {
        "requests": len(sequence),
        "seconds": elapsed,
        "requests_per_second": len(sequence) / elapsed,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / max(1, hits + misses),
        "lost_before_first_message": lost_before_start,
        "lost_mid_stream": lost_mid_stream,
    }


def router_for(addresses: list[str], policy: str) -> InferenceReplicas:
    routing, epsilon, floor = POLICIES[policy]
    return InferenceReplicas(
        ReplicaSource(addresses=tuple(addresses)),
        open_channel=open_channel,
        routing=routing,
        load_factor=epsilon,
        load_floor=floor,
        probe_seconds=0.5,
    )


async def measure(addresses: list[str], processes: list, rounds: int, requests: int) -> dict:
    routers = {policy: router_for(addresses, policy) for policy in POLICIES}
    for router in routers.values():
        await router.start()
    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    for number in range(rounds):
        sequence = zipf_sequence(requests, ADAPTERS, ZIPF_S, seed=number)
        order = list(POLICIES)[number % len(POLICIES) :] + list(POLICIES)[: number % len(POLICIES)]
        for policy in order:
            await empty_caches(routers[policy])
            runs[policy].append(await run_load(routers[policy], sequence))
            print(f"  round {number + 1} {policy}: {runs[policy][-1]}", flush=True)
    # Failover: kill the second replica a third of the way through an affinity run.
    await empty_caches(routers["affinity"])
    sequence = zipf_sequence(requests, ADAPTERS, ZIPF_S, seed=rounds)
    failover = await run_load(
        routers["affinity"], sequence, kill=lambda: processes[1].send_signal(signal.SIGKILL)
    )
    for router in routers.values():
        await router.close()
    return {"runs": runs, "failover": failover}


def simulated_hit_rate(sequence: list[int], owner) -> float:
    """Hits of one LRU cache of CACHED adapters per replica, each request sent to
    owner(position, adapter)."""
    caches: dict[int, OrderedDict[int, None]] = {}
    hits = 0
    for position, index in enumerate(sequence):
        cache = caches.setdefault(owner(position, index), OrderedDict())
        if index in cache:
            hits += 1
            cache.move_to_end(index)
        else:
            cache[index] = None
            if len(cache) > CACHED:
                cache.popitem(last=False)
    return hits / len(sequence)


def simulations(rounds: int, requests: int) -> dict[str, float]:
    replicas = [f"r{i}" for i in range(REPLICAS)]
    sequences = [zipf_sequence(requests, ADAPTERS, ZIPF_S, seed=n) for n in range(rounds)]
    return {
        "lru_perfect_affinity": statistics.median(
            simulated_hit_rate(s, lambda _, a: rendezvous_rank(f"{TENANT}/a{a}@0", replicas)[0])
            for s in sequences
        ),
        "lru_round_robin": statistics.median(
            simulated_hit_rate(s, lambda position, _: position % REPLICAS) for s in sequences
        ),
    }


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    model_dir = InferenceSettings().model_dir
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = make_adapters(model_dir, tmp / "adapters", ADAPTERS)
        sizes = [
            sum(t.numel() * 4 for t in load_file(p / "adapter_model.safetensors").values())
            for p in paths
        ]
        budget = CACHED * sum(sizes) // len(sizes)  # 32 adapters of the mean size
        redis_port = free_port()
        redis = start_redis_server(redis_port, str(tmp))
        env = {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "ADAPTER_STORE_DIR": str(tmp / "store"),
            "ADAPTER_CACHE_BYTES": str(budget),
            "ADAPTER_CACHE_TENANT_SHARE": "1",
            "MAX_QUEUED_PER_TENANT": "1000",
            "METRICS_PORT": "0",
            "LOG_LEVEL": "warning",
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // REPLICAS)),  # a share each
        }
        ports = [free_port() for _ in range(REPLICAS)]
        addresses = [f"127.0.0.1:{p}" for p in ports]
        processes = [start_replica(p, env, tmp / f"replica-{p}.log") for p in ports]
        try:
            wait_serving(addresses, processes)
            result = asyncio.run(register_and_measure(addresses, processes, paths, args))
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=30)
            redis.terminate()
            redis.wait()
    result |= {
        "replicas": REPLICAS,
        "adapters": ADAPTERS,
        "cache_budget_adapters": CACHED,
        "cache_budget_bytes": budget,
        "zipf_s": ZIPF_S,
        "concurrency": CONCURRENCY,
        "tokens": TOKENS,
        "rounds": args.rounds,
        "simulated": simulations(args.rounds, args.requests),
    }
    runs = result["runs"]
    for key, name in (("hit_rate", "hit_rate_ratio"), ("requests_per_second", "throughput_ratio")):
        result[name] = median(runs["affinity"], key) / median(runs["round_robin"], key)
    report(result)
    write_json("routing", result)


async def register_and_measure(addresses, processes, paths, args) -> dict:
    router = router_for(addresses, "affinity")
    await router.start()
    for i, path in enumerate(paths):
        files = [pb.AdapterFile(name=f.name, content=f.read_bytes()) for f in path.iterdir()]
        await router.RegisterAdapter(
            pb.RegisterAdapterRequest(tenant=TENANT, name=f"a{i}", files=files)
        )
    await router.close()
    return await measure(addresses, processes, args.rounds, args.requests)


def report(result: dict) -> None:
    runs = result["runs"]
    print(
        f"\nrouting: {result['replicas']} replicas, cache {result['cache_budget_adapters']} "
        f"adapters each, Zipf({result['zipf_s']}) over {result['adapters']} adapters, "
        f"{runs['affinity'][0]['requests']} streamed requests x {result['tokens']} tokens, "
        f"{result['concurrency']} at a time; medians of {result['rounds']} interleaved rounds "
        f"({os.cpu_count()} cores)"
    )
    print(f"{'policy':<16} {'hit rate':>9} {'misses':>7} {'req/s':>7} {'min-max req/s':>14}")
    for policy in POLICIES:
        speeds = [r["requests_per_second"] for r in runs[policy]]
        print(
            f"{policy:<16} {median(runs[policy], 'hit_rate'):>9.1%} "
            f"{median(runs[policy], 'misses'):>7.0f} "
            f"{statistics.median(speeds):>7.1f} {min(speeds):>6.1f}-{max(speeds):<7.1f}"
        )
    sim = result["simulated"]
    print(
        f"an LRU of {result['cache_budget_adapters']} per replica, simulated on the same "
        f"sequences: {sim['lru_perfect_affinity']:.1%} with perfect affinity, "
        f"{sim['lru_round_robin']:.1%} with round-robin"
    )
    print(
        f"affinity / round-robin: hit rate {result['hit_rate_ratio']:.2f}x, "
        f"throughput {result['throughput_ratio']:.2f}x"
    )
    f = result["failover"]
    print(
        f"one replica killed a third of the way through {f['requests']} requests: "
        f"{f['lost_before_first_message']} lost before their first message, "
        f"{f['lost_mid_stream']} cut mid-stream"
    )


if __name__ == "__main__":
    main()
