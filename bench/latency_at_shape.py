"""B2 at a realistic shape (`python -m bench.bench_serving --shape llama-8x1024`).

Latency under load of the engine itself, at the size users serve: --clients concurrent
clients each send --per-client completions one after another (--prompt random prompt
tokens, exactly --new new tokens, greedy) straight to the continuous-batching scheduler,
rounds interleaved two ways: each request with one of --distinct random PEFT adapters
(client i's k-th request uses adapter i + k), and with no adapter (the ceiling). What the
gateway and gRPC add does not depend on the model's shape; the default B2 measures it.
Reported: latency p50/p99 (submit to last token), time to first token p50 (queueing
included), tokens/s, and the peaks of the KV cache and LoRA stacks. Writes
bench/results/serving-<shape>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import MeasuredEngine, load_ours, make_adapters, write_json
from bench.shapes import build_model_dir, storage_dtype
from services.inference.decoding import DecodeSequence, SamplingConfig
from services.inference.lora import LoraWeights
from services.inference.scheduler import Scheduler
from services.inference.settings import BatchingLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, ...")
    parser.add_argument("--distinct", type=int, default=16, help="distinct adapters")
    parser.add_argument("--ranks", default="8,16,32,64", help="adapter ranks, cycled")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BatchingLimits.max_batch_size)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="results name (bench/results/<out>.json)")


async def closed_loop(
    scheduler: Scheduler, adapters: list[LoraWeights | None], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Every client's requests, one after another; latencies and times to first token."""
    config = SamplingConfig(args.new, temperature=0, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 3000, (args.clients, args.prompt), generator=generator).tolist()
    latency, first_token = [], []

    async def client(i: int) -> None:
        for k in range(args.per_client):
            adapter = adapters[(i + k) % len(adapters)]
            started = time.perf_counter()
            sequence = DecodeSequence(prompts[i], adapter, config)
            async for chunk in scheduler.submit(f"c{i}", sequence, stream=False):
                if chunk.generation is not None:
                    latency.append(time.perf_counter() - started)
                    first_token.append(chunk.queue_seconds + chunk.generation.time_to_first_token)

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    return {"latency": latency, "first_token": first_token, "wall": [time.perf_counter() - began]}


def run(args: argparse.Namespace) -> dict:
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.shape, Path(tmp) / "model", storage_dtype(args.dtype))
        engine = MeasuredEngine(model_dir, args.device, args.dtype)
        ours = load_ours(engine, make_adapters(model_dir, Path(tmp), args.distinct, ranks))
    scheduler = Scheduler(engine, BatchingLimits(max_batch_size=args.batch))
    scheduler.start()
    variants = {"loraplex": ours, "base": [None]}
    samples = {name: {"latency": [], "first_token": [], "wall": []} for name in variants}
    peaks = {name: {"kv_cache": 0, "lora_stacks": 0} for name in variants}
    try:
        for adapters in variants.values():  # warm-up
            asyncio.run(closed_loop(scheduler, adapters, args))
        for _ in range(args.rounds):
            for name, adapters in variants.items():
                engine.reset_peaks()
                measured = asyncio.run(closed_loop(scheduler, adapters, args))
                for key, values in measured.items():
                    samples[name][key] += values
                peak = peaks[name]
                peak["kv_cache"] = max(peak["kv_cache"], engine.peak_kv_bytes)
                peak["lora_stacks"] = max(peak["lora_stacks"], engine.peak_lora_bytes)
    finally:
        scheduler.stop()
    print(
        f"B2 latency, shape {args.shape}, {engine.device} "
        f"{str(engine.dtype).removeprefix('torch.')}: {args.clients} concurrent clients x "
        f"{args.per_client} completions ({args.prompt} prompt + {args.new} new tokens, greedy, "
        f"{args.distinct} adapters of ranks {args.ranks}), batches of {args.batch}, "
        f"{args.rounds} interleaved rounds"
    )
    print(
        f"{'variant':<9} {'p50 ms':>8} {'p99 ms':>8} {'first token p50 ms':>19} "
        f"{'tokens/s':>9} {'KV peak MiB':>12} {'LoRA stacks MiB':>16}"
    )
    tokens = args.clients * args.per_client * args.new
    report = {}
    for name, data in samples.items():
        p50, p99 = np.percentile(data["latency"], [50, 99]) * 1000
        row = {
            "p50_ms": float(p50),
            "p99_ms": float(p99),
            "first_token_p50_ms": float(np.percentile(data["first_token"], 50) * 1000),
            "tokens_per_second": tokens / statistics.median(data["wall"]),
            "peak_kv_cache_bytes": peaks[name]["kv_cache"],
            "peak_lora_stacks_bytes": peaks[name]["lora_stacks"],
        }
        report[name] = row
        print(
            f"{name:<9} {row['p50_ms']:>8.0f} {row['p99_ms']:>8.0f} "
            f"{row['first_token_p50_ms']:>19.0f} {row['tokens_per_second']:>9.0f} "
            f"{row['peak_kv_cache_bytes'] / 2**20:>12.1f} "
            f"{row['peak_lora_stacks_bytes'] / 2**20:>16.1f}"
        )
    adapter_bytes = sum(a.size_bytes for a in ours)
    print(f"adapters loaded: {adapter_bytes / 2**20:,.1f} MiB")
    options = {k: v for k, v in vars(args).items() if k != "out"}
    result = options | {"adapter_bytes": adapter_bytes, "b2": report}
    result["device"], result["dtype"] = str(engine.device), str(engine.dtype)
    write_json(args.out or f"serving-{args.shape}", result)
    return result
