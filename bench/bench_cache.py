"""B4: the adapter cache under a skewed workload, within its memory budget.

1,000 adapters registered for one tenant (each a distinct registration of a demo adapter's
files, so each is loaded and cached on its own), a cache budget that holds 64 of them, and
2,000 one-token generations whose adapters follow a Zipf law (s = 1.1, the usual shape of
per-tenant traffic), 16 at a time, through the inference domain layer (the server's
scheduler and cache). Reports the hit rate (with the best a 64-entry cache could do on the
same sequence: always keeping the 64 most popular) and the peak resident memory above what
the process used before the workload, against the budget. Writes bench/results/cache.json.
"""

from __future__ import annotations

import asyncio
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import write_json
from services.common.localhost import free_port, start_redis_server
from services.common.redis import connect
from services.inference.core import InferenceCore, SamplingRequest
from services.inference.settings import InferenceSettings
from services.stack import DEMO_ADAPTERS

ADAPTERS, CACHED, REQUESTS, CONCURRENCY, ZIPF_S = 1000, 64, 2000, 16, 1.1
DEMO = "retailer"


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def zipf_sequence(count: int, n: int, s: float, seed: int = 0) -> list[int]:
    ranks = np.arange(1, n + 1)
    weights = ranks**-s
    rng = np.random.default_rng(seed)
    return rng.choice(n, size=count, p=weights / weights.sum()).tolist()


async def run(redis_url: str, tmp: Path) -> dict:
    files = {p.name: p.read_bytes() for p in (DEMO_ADAPTERS / DEMO).iterdir() if p.is_file()}
    settings = InferenceSettings(
        redis_url=redis_url,
        adapter_store_dir=tmp / "store",
        max_queued_per_tenant=REQUESTS,
        max_queued_requests=REQUESTS,
    )
    redis = connect(redis_url)
    core = InferenceCore(settings, redis)
    await core.start()
    started = time.perf_counter()
    records = [await core.register_adapter("bench", f"a{i}", 0, files) for i in range(ADAPTERS)]
    registered_in = time.perf_counter() - started
    size = records[0].size_bytes
    core.cache.host.capacity_bytes = CACHED * size  # the budget: 64 of them
    await core.generate("bench", "", 0, SamplingRequest(1), prompt="warm up")  # base only
    base_rss = rss_now_bytes()
    sequence = zipf_sequence(REQUESTS, ADAPTERS, ZIPF_S)
    queue = asyncio.Queue()
    for index in sequence:
        queue.put_nowait(index)
    peak = base_rss

    async def worker() -> None:
        nonlocal peak
        while not queue.empty():
            index = queue.get_nowait()
            await core.generate(
                "bench", f"a{index}", 0, SamplingRequest(1, temperature=0), prompt="Hello"
            )
            peak = max(peak, rss_now_bytes())

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - began
    (host,) = core.cache_stats()
    core.close()
    await redis.aclose()
    popular = {a for a, _ in Counter(sequence).most_common(CACHED)}
    first_seen: set[int] = set()
    best_hits = 0
    for index in sequence:  # an oracle that holds the 64 most popular once seen
        if index in popular and index in first_seen:
            best_hits += 1
        first_seen.add(index)
    return {
        "adapter_bytes": size,
        "budget_bytes": core.cache.host.capacity_bytes,
        "requests": REQUESTS,
        "registered_seconds": registered_in,
        "hits": host.hits,
        "misses": host.misses,
        "evictions": host.evictions,
        "hit_rate": host.hits / (host.hits + host.misses),
        "oracle_hit_rate": best_hits / REQUESTS,
        "load_p50_ms": host.load_seconds_p50 * 1000,
        "load_p99_ms": host.load_seconds_p99 * 1000,
        "max_cached_bytes": host.used_bytes,
        "rss_base_bytes": base_rss,
        "rss_peak_growth_bytes": peak - base_rss,
        "requests_per_second": REQUESTS / elapsed,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_redis_server(port, tmp)
        try:
            result = asyncio.run(run(f"redis://127.0.0.1:{port}/0", Path(tmp)))
        finally:
            server.terminate()
            server.wait()
    mib = 1024 * 1024
    print(
        f"B4 cache: {ADAPTERS} adapters of {result['adapter_bytes'] / 1024:.0f} KiB, budget for "
        f"{CACHED} ({result['budget_bytes'] / mib:.1f} MiB), {REQUESTS} requests, Zipf s={ZIPF_S}"
    )
    print(f"{'measure':<34} {'value':>12}")
    rows = [
        ("hit rate", f"{result['hit_rate']:.1%}"),
        ("hit rate of a top-64 oracle", f"{result['oracle_hit_rate']:.1%}"),
        ("misses / evictions", f"{result['misses']} / {result['evictions']}"),
        (
            "load on a miss p50 / p99 ms",
            f"{result['load_p50_ms']:.1f} / {result['load_p99_ms']:.1f}",
        ),
        ("cached bytes at the end (MiB)", f"{result['max_cached_bytes'] / mib:.1f}"),
        ("peak RSS above base (MiB)", f"{result['rss_peak_growth_bytes'] / mib:.1f}"),
        ("requests/s (1 token each)", f"{result['requests_per_second']:.0f}"),
    ]
    for label, value in rows:
        print(f"{label:<34} {value:>12}")
    within = result["rss_peak_growth_bytes"] <= result["budget_bytes"] * 1.5 + 64 * mib
    print(f"peak RSS within budget + base (+50% and 64 MiB for allocator slack): {within}")
    write_json("cache", result)


if __name__ == "__main__":
    main()
