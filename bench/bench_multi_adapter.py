"""B1: generation throughput with many adapters in one batch, against the alternatives.

For each number of distinct adapters (1, 16 and 256 by default), max(--requests (64),
distinct) requests spread evenly over that many real PEFT adapters (ranks 8-64 by default,
three different sets of target modules), 32 prompt + exactly 32 new tokens each, greedy,
all four ways interleaved for several rounds:
  (a) peft-switch   PEFT set_adapter() and generate() per request, one at a time (the
                    first --switch-requests only: alone, each costs the same however many)
  (b) peft-mixed    PEFT generate() on batches of --batch rows with adapter_names= per row
  (c) loraplex      all requests submitted at once to the server's continuous-batching
                    scheduler (at most --batch rows decoded together, shared KV cache)
  (d) base          the same scheduler and requests with no adapter at all (the ceiling)
Also reported for (c) and (d): the bytes of the distinct adapters loaded (what the adapter
cache holds), and the peaks, over the run, of the batch's LoRA stacks and of its KV cache.

`--shape` picks the model: `tiny` (the repo's loraplex-tiny, the default) or a randomly
initialised model of a real architecture's shape (bench/shapes.py: `llama-1b`,
`llama-8x1024`). `--device`/`--dtype` as the inference settings take them. Prints tables,
writes bench/results/multi_adapter[-<shape>].json (or --out). Runs on CUDA unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import (
    MeasuredEngine,
    interleaved,
    load_ours,
    load_peft,
    make_adapters,
    summarize,
    write_json,
)
from bench.shapes import SHAPES, TINY, build_model_dir, storage_dtype
from services.inference.decoding import DecodeSequence, SamplingConfig
from services.inference.lora import LoraWeights
from services.inference.scheduler import Scheduler
from services.inference.settings import BatchingLimits

VARIANTS = ("(a) peft-switch", "(b) peft-mixed", "(c) loraplex", "(d) base")
# (c)'s speed over each other variant's, at 16 distinct adapters: the issues' targets.
TARGETS = {
    TINY: {"(d) base": 0.85, "(b) peft-mixed": 1.3, "(a) peft-switch": 8.0},
    "realistic": {"(d) base": 0.9, "(b) peft-mixed": 1.3, "(a) peft-switch": 3.0},
}
TARGET_DISTINCT = 16


def prompts(count: int, length: int) -> list[list[int]]:
    ids = torch.randint(3, 3000, (count, length), generator=torch.Generator().manual_seed(0))
    return ids.tolist()


def agreement(engine: MeasuredEngine, peft, ours: list[LoraWeights]) -> dict[str, float]:
    """One mixed-adapter prefill (up to 7 adapters and a row without), loraplex against
    PEFT's adapter_names=: that both compute the same thing on this device and dtype."""
    rows = [*range(min(len(ours), 7)), None]
    ids = torch.tensor(prompts(len(rows), 16), device=engine.device)
    names = [f"a{r}" if r is not None else "__base__" for r in rows]
    with torch.inference_mode():
        theirs = peft(input_ids=ids, adapter_names=names).logits.float()
        with engine.adapters([ours[r] if r is not None else None for r in rows]):
            mine = engine.model(input_ids=ids).logits.float()
    top1 = (mine.argmax(-1) == theirs.argmax(-1)).float().mean()
    return {"max_abs_logit_diff": float((mine - theirs).abs().max()), "top1_agreement": float(top1)}


def through_scheduler(
    scheduler: Scheduler, rows: list[list[int]], adapters: list[LoraWeights | None], new: int
) -> None:
    config = SamplingConfig(new, temperature=0, ignore_eos=True)

    async def run() -> None:
        requests = [
            scheduler.submit("bench", DecodeSequence(ids, adapter, config), stream=False)
            for ids, adapter in zip(rows, adapters, strict=True)
        ]
        for request in requests:
            async for _ in request:
                pass

    asyncio.run(run())


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_multi_adapter")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=TINY)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, ...")
    parser.add_argument("--distinct", default="1,16,256", help="distinct adapter counts")
    parser.add_argument("--ranks", default="8,16,32,64", help="adapter ranks, cycled")
    parser.add_argument("--requests", type=int, default=64, help="at least; else distinct")
    parser.add_argument("--batch", type=int, default=64, help="rows decoded together")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--switch-requests", type=int, default=64, help="requests (a) runs, one at a time"
    )
    parser.add_argument("--out", help="results name (bench/results/<out>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    distinct_counts = [int(n) for n in args.distinct.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.shape, Path(tmp) / "model", storage_dtype(args.dtype))
        engine = MeasuredEngine(model_dir, args.device, args.dtype)
        paths = make_adapters(model_dir, Path(tmp), max(distinct_counts), ranks)
        ours = load_ours(engine, paths)
        peft = load_peft(model_dir, paths, engine.device, engine.dtype)
    scheduler = Scheduler(
        engine,
        BatchingLimits(
            max_batch_size=args.batch, max_queued_requests=4096, max_queued_per_tenant=4096
        ),
    )
    scheduler.start()
    parameters = sum(p.numel() for p in engine.model.parameters())
    print(
        f"B1 throughput, shape {args.shape} ({parameters / 1e6:,.0f} M parameters), "
        f"{engine.device} {str(engine.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads: {args.prompt} prompt + {args.new} new tokens "
        f"per request, greedy, batches of {args.batch}, adapter ranks {args.ranks}, "
        f"{args.rounds} interleaved rounds"
    )
    same = agreement(engine, peft, ours)
    print(
        f"loraplex vs PEFT, one mixed prefill: max |logit difference| "
        f"{same['max_abs_logit_diff']:.2g}, top-1 token agreement {same['top1_agreement']:.1%}"
    )
    results = {}
    try:
        for distinct in distinct_counts:
            results[str(distinct)] = measure(engine, scheduler, peft, ours[:distinct], args)
    finally:
        scheduler.stop()
    targets = TARGETS[TINY if args.shape == TINY else "realistic"]
    verdicts = {}
    if str(TARGET_DISTINCT) in results:
        speed = results[str(TARGET_DISTINCT)]["variants"]
        for other, goal in targets.items():
            ratio = speed["(c) loraplex"]["tokens_per_second"] / speed[other]["tokens_per_second"]
            verdicts[f"(c) >= {goal} x {other}"] = {"measured": ratio, "met": ratio >= goal}
            print(
                f"target at {TARGET_DISTINCT} distinct: (c) >= {goal} x {other:<16} "
                f"measured {ratio:5.2f}x  {'met' if ratio >= goal else 'MISSED'}"
            )
    options = {k: v for k, v in vars(args).items() if k != "out"}
    report = options | {"parameters": parameters, "agreement": same, "by_distinct": results}
    report["device"], report["dtype"] = str(engine.device), str(engine.dtype)
    name = args.out or ("multi_adapter" if args.shape == TINY else f"multi_adapter-{args.shape}")
    write_json(name, report | {"targets": verdicts})
    return report | {"targets": verdicts}


def measure(engine: MeasuredEngine, scheduler: Scheduler, peft, adapters, args) -> dict:
    """The four variants at len(adapters) distinct adapters; prints their table."""
    count = max(args.requests, len(adapters))
    rows = prompts(count, args.prompt)
    which = [i % len(adapters) for i in range(count)]
    batch = torch.tensor(rows, device=engine.device)
    generate = {"max_new_tokens": args.new, "min_new_tokens": args.new, "do_sample": False}
    generate["pad_token_id"] = engine.pad_token_id

    # Switching serves each request alone, so its speed per token does not depend on how
    # many there are: it runs only the first --switch-requests of them.
    switched = min(count, args.switch_requests)

    def peft_switch() -> None:
        for r, a in enumerate(which[:switched]):
            peft.set_adapter(f"a{a}")
            peft.generate(input_ids=batch[r : r + 1], **generate)

    def peft_mixed() -> None:
        for start in range(0, count, args.batch):
            part = slice(start, start + args.batch)
            names = [f"a{a}" for a in which[part]]
            peft.generate(input_ids=batch[part], adapter_names=names, **generate)

    peaks: dict[str, dict[str, int]] = {}

    def scheduled(name: str, row_adapters: list[LoraWeights | None]) -> Callable[[], None]:
        def run() -> None:
            engine.reset_peaks()
            through_scheduler(scheduler, rows, row_adapters, args.new)
            peaks[name] = {"kv_cache": engine.peak_kv_bytes, "lora_stacks": engine.peak_lora_bytes}

        return run

    variants = {
        "(a) peft-switch": peft_switch,
        "(b) peft-mixed": peft_mixed,
        "(c) loraplex": scheduled("(c) loraplex", [adapters[a] for a in which]),
        "(d) base": scheduled("(d) base", [None] * count),
    }
    with torch.inference_mode():
        samples = interleaved(variants, args.rounds)
    adapter_bytes = sum(a.size_bytes for a in adapters)
    print(
        f"\n{len(adapters)} distinct adapters, {count} requests ((a): {switched}), "
        f"adapters loaded: {adapter_bytes / 2**20:,.1f} MiB"
    )
    print(
        f"{'variant':<16} {'median s':>9} {'min-max s':>14} {'tokens/s':>9} {'(c) x':>8} "
        f"{'KV peak MiB':>12} {'LoRA stacks MiB':>16}"
    )
    ours_speed = count * args.new / statistics.median(samples["(c) loraplex"]) * 1000
    report = {}
    for name, values in samples.items():
        row = summarize(values)
        done = switched if name == "(a) peft-switch" else count
        row["tokens_per_second"] = done * args.new / row["median_ms"] * 1000
        memory = peaks.get(name)
        if memory:
            row["peak_kv_cache_bytes"] = memory["kv_cache"]
            row["peak_lora_stacks_bytes"] = memory["lora_stacks"]
        report[name] = row
        kv = f"{memory['kv_cache'] / 2**20:>12.1f}" if memory else f"{'-':>12}"
        stacks = f"{memory['lora_stacks'] / 2**20:>16.1f}" if memory else f"{'-':>16}"
        print(
            f"{name:<16} {row['median_ms'] / 1000:>9.2f} {row['min_ms'] / 1000:>6.2f}-"
            f"{row['max_ms'] / 1000:<7.2f} {row['tokens_per_second']:>9.0f} "
            f"{ours_speed / row['tokens_per_second']:>7.2f}x {kv} {stacks}"
        )
    return {
        "requests": count,
        "switch_requests": switched,
        "adapter_bytes": adapter_bytes,
        "variants": report,
    }


if __name__ == "__main__":
    main()
