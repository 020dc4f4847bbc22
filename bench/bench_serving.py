"""B2 latency under load through the gateway, and B3 hot-swap under that load.

B2: 32 concurrent clients, each sending completions one after another (16 new tokens,
greedy) over the three demo tenants' adapters, three ways, rounds interleaved (the others
idle meanwhile): through the gateway of the whole stack (`python -m services.stack` on
free ports: every completion also feeds analytics and active learning), through the
gateway of a stack with only inference behind it ("gateway-bare"), and in this process
straight on the inference domain layer (RealtimeCompositor: same model, same scheduler).
The difference in p50 is what the gateway and gRPC (and, for the whole stack, the work
each completion causes elsewhere) add under load; one client asking for 1 token measures
it unloaded.

B3: during one more gateway round, 100 swaps of the retailer adapter between versions 1
and 2 (POST /composition/swap). For each swap: how long until new requests get the new
version (the swap call), how long until the first response from the new version, and
whether any request failed or was served an older version after its swap returned.
Prints tables, writes bench/results/serving.json.

`--shape llama-8x1024` (or another of bench/shapes.py) measures B2 instead in-process at
that model shape, with random adapters (bench/latency_at_shape.py says how).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench import latency_at_shape
from bench.common import write_json
from bench.shapes import SHAPES, TINY
from services.common.localhost import free_port, start_redis_server
from services.inference.library import RealtimeCompositor
from services.inference.settings import InferenceSettings
from services.stack import DEMO_ADAPTERS, DEMO_TENANTS, LocalStack, start_on_free_ports

CLIENTS, PER_CLIENT, NEW_TOKENS, ROUNDS, SWAPS = 32, 6, 16, 3, 100
PROMPTS = {
    "retailer": "Customer: Where is my order 4821?\nAgent:",
    "bank": "Customer: I lost my card yesterday.\nAgent:",
    "airline": "Customer: My flight was delayed, what are my options?\nAgent:",
}


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50_ms": float(p50) * 1000, "p99_ms": float(p99) * 1000, "count": len(values)}


class Gateway:
    def __init__(self, stack: LocalStack) -> None:
        self.client = httpx.AsyncClient(base_url=stack.url, timeout=120)
        self.keys = {t: stack.keys[f"{t.upper()}_KEY"] for t in DEMO_TENANTS}

    async def complete(self, tenant: str, tokens: int) -> tuple[float, int, int]:
        """(seconds, completion tokens, adapter version that served)."""
        started = time.perf_counter()
        reply = await self.client.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {self.keys[tenant]}"},
            json={
                "model": f"{tenant}-support",
                "prompt": PROMPTS[tenant],
                "max_tokens": tokens,
                "temperature": 0,
            },
        )
        reply.raise_for_status()
        body = reply.json()
        version = body["loraplex"]["adapter"]["version"]
        return time.perf_counter() - started, body["usage"]["completion_tokens"], version


class InProcess:
    def __init__(self, compositor: RealtimeCompositor) -> None:
        self.compositor = compositor

    async def complete(self, tenant: str, tokens: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        reply = await self.compositor.generate(
            tenant,
            PROMPTS[tenant],
            adapter=f"{tenant}-support",
            max_new_tokens=tokens,
            temperature=0,
        )
        seconds = time.perf_counter() - started
        return seconds, reply.generation.completion_tokens, reply.adapter.version


async def load(
    target,
    clients: int,
    per_client: int,
    tokens: int,
    log: list | None = None,
    stop: asyncio.Event | None = None,
):
    """Latencies, tokens/s and failures of `clients` concurrent clients sending
    `per_client` requests each (or, with `stop`, until it is set)."""
    latencies: list[float] = []
    produced = 0
    failures = 0

    async def client(index: int) -> None:
        nonlocal produced, failures
        tenant = DEMO_TENANTS[index % len(DEMO_TENANTS)]
        for _ in range(per_client):
            if stop is not None and stop.is_set():
                return
            started = time.perf_counter()
            try:
                seconds, count, version = await target.complete(tenant, tokens)
            except httpx.HTTPError:
                failures += 1
                continue
            latencies.append(seconds)
            produced += count
            if log is not None:
                log.append((tenant, started, time.perf_counter(), version))

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - began
    return latencies, produced / wall, failures


async def swaps_under_load(stack: LocalStack, gateway: Gateway) -> dict:
    key = gateway.keys["retailer"]
    admin = {"Authorization": f"Bearer {stack.admin_key}"}
    files = [
        ("files", (p.name, p.read_bytes())) for p in sorted((DEMO_ADAPTERS / "bank").iterdir())
    ]
    # Version 2 of retailer-support: different weights (the bank adapter's), same name.
    upload = await gateway.client.post(
        "/admin/tenants/retailer/adapters",
        data={"name": "retailer-support"},
        files=files,
        headers=admin,
    )
    upload.raise_for_status()
    log: list[tuple[str, float, float, int]] = []
    swaps: list[tuple[float, float, int]] = []  # (sent, returned, version)

    async def swapper() -> None:
        await asyncio.sleep(1.0)
        for i in range(SWAPS):
            version = 1 if i % 2 == 0 else 2
            sent = time.perf_counter()
            reply = await gateway.client.post(
                "/composition/swap",
                headers={"Authorization": f"Bearer {key}"},
                json={"adapter": "retailer-support", "version": version},
            )
            reply.raise_for_status()
            swaps.append((sent, time.perf_counter(), version))
            await asyncio.sleep(0.15)

    stop = asyncio.Event()
    runner = asyncio.ensure_future(load(gateway, CLIENTS, 10**9, NEW_TOKENS, log, stop))
    await swapper()
    await asyncio.sleep(3)  # requests started after the last swap get to finish
    stop.set()
    _, _, failures = await runner
    retailer = [(s, e, v) for t, s, e, v in log if t == "retailer"]
    to_visible = [returned - sent for sent, returned, _ in swaps]
    to_request, to_response, stale = [], [], 0
    for i, (sent, returned, version) in enumerate(swaps):
        until = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
        # A request that started after this swap returned and ended before the next swap
        # was sent can only have been served by this swap's version.
        stale += sum(1 for s, e, v in retailer if returned < s and e < until and v != version)
        new = [(s, e) for s, e, v in retailer if s > sent and v == version]
        if new:
            to_request.append(min(s for s, _ in new) - sent)
            to_response.append(min(e for _, e in new) - sent)
    return {
        "swaps": len(swaps),
        "swap_call": percentiles(to_visible),
        "swap_to_first_request": percentiles(to_request),
        "swap_to_first_response": percentiles(to_response),
        "failed_requests": failures,
        "stale_responses": stale,
        "retailer_requests": len(retailer),
    }


async def main_async() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}"
        stacks: list[LocalStack] = []
        try:
            # The whole stack, and one with only inference behind the gateway (no analytics,
            # experiments or active-learning work per completion); separate Redis databases.
            for db, services in ((0, ()), (1, ("inference",))):
                run_dir = Path(tmp) / f"stack{db}"
                run_dir.mkdir()
                env = {"LOG_LEVEL": "warning"}
                stacks.append(start_on_free_ports(run_dir, f"{url}/{db}", env, services=services))
            await run(*stacks, f"{url}/2", Path(tmp))
        finally:
            for stack in stacks:
                stack.stop()
            redis.terminate()
            redis.wait()


async def run(stack: LocalStack, bare: LocalStack, redis_url: str, tmp: Path) -> None:
    gateway = Gateway(stack)
    settings = InferenceSettings(adapter_store_dir=tmp / "in-process-store")
    compositor = await RealtimeCompositor(redis_url, settings).start()
    for tenant in DEMO_TENANTS:  # the same adapters, registered for the in-process tenants
        await compositor.register(tenant, f"{tenant}-support", DEMO_ADAPTERS / tenant)
    in_process = InProcess(compositor)
    targets = {"gateway": gateway, "gateway-bare": Gateway(bare), "in-process": in_process}
    results: dict[str, dict[str, list]] = {
        name: {"latency": [], "speed": [], "single": []} for name in targets
    }
    for target in targets.values():  # warm-up
        await load(target, 4, 1, NEW_TOKENS)
    for _ in range(ROUNDS):  # interleaved
        for name, target in targets.items():
            latencies, speed, _ = await load(target, CLIENTS, PER_CLIENT, NEW_TOKENS)
            results[name]["latency"] += latencies
            results[name]["speed"].append(speed)
            single, _, _ = await load(target, 1, 20, 1)
            results[name]["single"] += single
    report = {}
    print(
        f"B2 latency: {CLIENTS} concurrent clients x {PER_CLIENT} completions "
        f"({NEW_TOKENS} new tokens, greedy, 3 tenants' adapters), {ROUNDS} interleaved rounds"
    )
    print(f"{'path':<13} {'p50 ms':>8} {'p99 ms':>8} {'tokens/s':>9} {'1-token p50 ms':>15}")
    for name, data in results.items():
        row = percentiles(data["latency"])
        row["tokens_per_second"] = statistics.median(data["speed"])
        row["single_token_p50_ms"] = percentiles(data["single"])["p50_ms"]
        report[name] = row
        print(
            f"{name:<13} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
            f"{row['tokens_per_second']:>9.0f} {row['single_token_p50_ms']:>15.1f}"
        )
    overhead = {}
    for name in ("gateway", "gateway-bare"):
        overhead[name] = {
            "under_load_p50": report[name]["p50_ms"] - report["in-process"]["p50_ms"],
            "unloaded_p50": report[name]["single_token_p50_ms"]
            - report["in-process"]["single_token_p50_ms"],
        }
        print(
            f"{name} overhead over in-process, p50: under load "
            f"{overhead[name]['under_load_p50']:.1f} ms, unloaded "
            f"{overhead[name]['unloaded_p50']:.1f} ms (target <= 3 ms)"
        )
    await compositor.close()

    swap = await swaps_under_load(stack, gateway)
    print(f"\nB3 hot-swap: {swap['swaps']} swaps during the same load")
    print(f"{'measure':<38} {'p50 ms':>8} {'p99 ms':>8}")
    for label, key in (
        ("swap call (new requests see it)", "swap_call"),
        ("swap -> first request on new version", "swap_to_first_request"),
        ("swap -> its response", "swap_to_first_response"),
    ):
        print(f"{label:<38} {swap[key]['p50_ms']:>8.1f} {swap[key]['p99_ms']:>8.1f}")
    print(
        f"failed requests {swap['failed_requests']}, stale responses {swap['stale_responses']} "
        f"(of {swap['retailer_requests']} retailer requests)"
    )
    await gateway.client.aclose()
    write_json(
        "serving",
        {
            "clients": CLIENTS,
            "per_client": PER_CLIENT,
            "new_tokens": NEW_TOKENS,
            "rounds": ROUNDS,
            "b2": report,
            "b2_overhead_ms": overhead,
            "b3": swap,
        },
    )


def main(argv: list[str] | None = None) -> dict | None:
    """B2 and B3; with --shape, B2 at that shape instead (its results returned)."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_serving")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=TINY,
        help="another shape than tiny: B2 in-process at that shape (bench/latency_at_shape.py)",
    )
    latency_at_shape.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.shape != TINY:
        return latency_at_shape.run(args)
    asyncio.run(main_async())
    return None


if __name__ == "__main__":
    main()
