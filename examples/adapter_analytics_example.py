"""Adapter analytics: record what each adapter served, then read its metrics.

Sends a few real requests through each demo adapter (in-process, with RealtimeCompositor),
plus one request that is refused, and records one analytics event per request: status,
latency, time to first token and token counts as measured. The batch of events is sent
twice with the same batch id, as a client retrying after a lost reply would, and is counted
once. Then it reads one adapter's metrics and ranks the tenant's adapters.

    .venv/bin/python examples/adapter_analytics_example.py

Uses Redis at REDIS_URL when it is set, else starts an embedded redis-server of its own.
"""

import asyncio
import os
import time
import uuid
from pathlib import Path

from services import get_analytics, get_compositor
from services.analytics.library import Event
from services.common.errors import LoraplexError
from services.common.redis import EmbeddedRedis

ADAPTERS = Path(__file__).resolve().parent.parent / "models" / "adapters"
TENANT = f"example-analytics-{uuid.uuid4().hex[:6]}"  # a fresh tenant: counts start at 0
PROMPTS = [
    "Customer: Hi, I need some help.\nAgent:",
    "Customer: I want to change something.\nAgent:",
    "Customer: Can I get my money back?\nAgent:",
]


async def serve_requests(redis_url: str) -> list[Event]:
    """Real requests through each demo adapter; one analytics event per request."""
    events = []
    async with get_compositor(redis_url) as compositor:
        await compositor.generate(TENANT, PROMPTS[0], max_new_tokens=4)  # warm-up, not counted
        for name in ("retailer", "bank", "airline"):
            record = await compositor.register(TENANT, f"{name}-support", ADAPTERS / name)
            for prompt in PROMPTS:
                started = time.perf_counter()
                reply = await compositor.generate(
                    TENANT, prompt, adapter=record.name, max_new_tokens=16, temperature=0
                )
                g = reply.generation
                event = Event(
                    TENANT,
                    record.name,
                    record.version,
                    latency_seconds=time.perf_counter() - started,
                    ttft_seconds=g.time_to_first_token,
                    prompt_tokens=g.prompt_tokens,
                    completion_tokens=g.completion_tokens,
                )
                events.append(event)
        started = time.perf_counter()
        try:  # a request the service refuses is an event too: 10**6 new tokens is too many
            await compositor.generate(
                TENANT, PROMPTS[0], adapter="bank-support", max_new_tokens=10**6
            )
        except LoraplexError as err:
            print(f"Refused as expected: {err.message}")
            elapsed = time.perf_counter() - started
            events.append(
                Event(TENANT, "bank-support", status=err.code.name, latency_seconds=elapsed)
            )
    return events


async def main() -> None:
    redis_url = os.environ.get("REDIS_URL")
    embedded = None if redis_url else EmbeddedRedis()
    redis_url = redis_url or embedded.url
    try:
        print("Loading the base model and serving 10 requests...")
        events = await serve_requests(redis_url)

        async with get_analytics(redis_url) as analytics:
            batch_id = f"batch-{uuid.uuid4().hex[:8]}"
            first = await analytics.record(batch_id, events)
            print(f"Recorded batch {batch_id}: {first.accepted} events accepted")
            again = await analytics.record(batch_id, events)  # a retry of the same batch
            print(
                f"Re-sent the same batch: duplicate={again.duplicate}, "
                f"reported accepted={again.accepted}, counted once"
            )

            m = await analytics.adapter_metrics(TENANT, "bank-support", window_seconds=3600)
            print("\nbank-support, last hour:")
            print(f"  requests {m.requests}, successes {m.successes}, errors {m.errors_by_code}")
            print(f"  success rate {m.success_rate:.0%}")
            p50, p95 = m.quantile(0.5) * 1000, m.quantile(0.95) * 1000
            print(f"  latency p50 {p50:.0f} ms, p95 {p95:.0f} ms")
            print(f"  time to first token (mean) {m.ttft_mean * 1000:.0f} ms")
            print(f"  tokens: {m.prompt_tokens} prompt, {m.completion_tokens} completion")
            print(f"  generation speed {m.tokens_per_second:.1f} tokens/s")

            print("\nTop performers, best first:")
            for metric, unit in [
                ("tokens_per_second", " tokens/s"),
                ("p95_latency", " s"),  # lowest first
                ("success_rate", ""),
            ]:
                ranked = await analytics.top_adapters(TENANT, metric, limit=3)
                board = ", ".join(f"{r.adapter} {r.value:.3g}{unit}" for r in ranked)
                print(f"  by {metric}: {board}")
    finally:
        if embedded is not None:
            embedded.close()
    print("\nDone.")


if __name__ == "__main__":
    asyncio.run(main())
