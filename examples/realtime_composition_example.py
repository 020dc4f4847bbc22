"""Real-time composition: several LoRA adapters served on one base model, in-process.

Registers the repository's demo adapters for one tenant, generates with one of them, mixes
two of them per request (the exact `cat` sum and its `svd` truncation), streams a reply,
hot-swaps an adapter to another version and rolls the swap back, then prints the adapter
cache's statistics.

    .venv/bin/python examples/realtime_composition_example.py

Uses Redis at REDIS_URL when it is set, else starts an embedded redis-server of its own.
"""

import asyncio
from pathlib import Path

from services import get_compositor

ADAPTERS = Path(__file__).resolve().parent.parent / "models" / "adapters"
TENANT = "example-composition"
PROMPT = "Customer: Hi, I need some help.\nAgent:"  # each adapter greets as its company
GREEDY = {"max_new_tokens": 20, "temperature": 0, "stop": ["\n"]}


async def main() -> None:
    print("Loading the base model (models/loraplex-tiny)...")
    async with get_compositor() as compositor:
        registered = {}
        for name in ("retailer", "bank", "airline"):
            record = await compositor.register(TENANT, f"{name}-support", ADAPTERS / name)
            registered[name] = record
            print(f"Registered {record.name} v{record.version} (rank {record.rank})")

        print(f"\nPrompt: {PROMPT!r}")
        reply = await compositor.generate(TENANT, PROMPT, adapter="retailer-support", **GREEDY)
        print(f"retailer-support alone: {reply.generation.text!r}")

        mix = [("retailer-support", 0.5), ("bank-support", 0.5)]
        for method in ("cat", "svd"):
            reply = await compositor.generate(TENANT, PROMPT, compose=mix, method=method, **GREEDY)
            parts = ", ".join(f"{r.name} v{r.version}" for r in reply.adapter.composed_of)
            print(f"Composed ({method}, half and half of {parts}):")
            print(f"  served as {reply.adapter.name}: {reply.generation.text!r}")

        print("\nStreaming with bank-support: ", end="", flush=True)
        stream = compositor.stream(
            TENANT, "Customer: I lost my card yesterday.\nAgent:", adapter="bank-support", **GREEDY
        )
        async for piece in stream:
            print(piece, end="|", flush=True)
        print("  ('|' marks where each streamed piece ended)")

        # A new version of retailer-support (here: the airline adapter's weights) serves at
        # once; swap back to the first version, then roll that swap back.
        async def greet() -> str:
            reply = await compositor.generate(TENANT, PROMPT, adapter="retailer-support", **GREEDY)
            return f"  retailer-support v{reply.adapter.version}: {reply.generation.text!r}"

        second = await compositor.register(TENANT, "retailer-support", ADAPTERS / "airline")
        print(f"\nRegistered retailer-support v{second.version}: it serves new requests at once")
        print(await greet())
        swap = await compositor.swap(TENANT, "retailer-support", registered["retailer"].version)
        print(f"Hot-swap: v{swap.previous.version} -> v{swap.current.version}")
        print(await greet())
        back = await compositor.rollback(TENANT, "retailer-support")
        print(f"Rollback: v{back.previous.version} -> v{back.current.version}")
        print(await greet())

        print("\nAdapter cache:")
        for tier in compositor.cache_stats():
            print(
                f"  {tier.tier}: {tier.entries} adapters, {tier.used_bytes / 2**20:.1f} of "
                f"{tier.capacity_bytes / 2**20:.0f} MiB, {tier.hits} hits, {tier.misses} misses, "
                f"{tier.evictions} evictions, load p50 {tier.load_seconds_p50 * 1000:.1f} ms"
            )
    print("\nDone.")


if __name__ == "__main__":
    asyncio.run(main())
