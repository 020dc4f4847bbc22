"""B1: generation throughput with many adapters in one batch, against the alternatives.

64 requests over 16 real PEFT adapters (ranks 8-16, different target modules), 32 prompt
tokens + exactly 32 new tokens each, greedy, measured 5 times interleaved:
  (a) peft-switch   PEFT set_adapter() and generate() per request, one at a time
  (b) peft-mixed    PEFT generate() on the whole batch with adapter_names= per row
  (c) loraplex      the 64 requests submitted at once to the server's continuous-batching
                    scheduler (per-row gathered LoRA, shared KV cache)
  (d) base          the same scheduler and requests with no adapter at all (the ceiling)
Then (c) with 1, 64 and 256 distinct adapters. Prints tables, writes
bench/results/multi_adapter.json. Runs on CUDA unchanged when present.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from functools import partial
from pathlib import Path

import torch

from bench.common import interleaved, load_ours, load_peft, make_adapters, summarize, write_json
from services.inference.decoding import DecodeSequence, SamplingConfig
from services.inference.engine import Engine
from services.inference.lora import LoraWeights
from services.inference.scheduler import Scheduler
from services.inference.settings import BatchingLimits, InferenceSettings

REQUESTS, ADAPTERS, PROMPT, NEW, ROUNDS = 64, 16, 32, 32, 5
TARGETS = {"(c) >= 0.85 x (d)": 0.85, "(c) >= 1.3 x (b)": 1.3, "(c) >= 8 x (a)": 8.0}


def prompts(count: int) -> list[list[int]]:
    ids = torch.randint(3, 3000, (count, PROMPT), generator=torch.Generator().manual_seed(0))
    return ids.tolist()


def through_scheduler(
    scheduler: Scheduler, rows: list[list[int]], adapters: list[LoraWeights | None]
) -> None:
    config = SamplingConfig(NEW, temperature=0, ignore_eos=True)

    async def run() -> None:
        requests = [
            scheduler.submit("bench", DecodeSequence(ids, adapter, config), stream=False)
            for ids, adapter in zip(rows, adapters, strict=True)
        ]
        for request in requests:
            async for _ in request:
                pass

    asyncio.run(run())


def synthetic(engine: Engine, like: list[LoraWeights], count: int) -> list[LoraWeights]:
    """`count` distinct adapters shaped like the real ones (fresh tensors, same ranks)."""
    made = []
    for i in range(count):
        model = like[i % len(like)]
        modules = {
            name: type(m)(torch.randn_like(m.a) * 0.01, torch.randn_like(m.b) * 0.01, m.scaling)
            for name, m in model.modules.items()
        }
        made.append(LoraWeights(modules, model.rank, model.lora_alpha, model.target_modules))
    return made


def main() -> None:
    model_dir = InferenceSettings().model_dir
    engine = Engine(model_dir)
    limit = max(REQUESTS, 64)
    scheduler = Scheduler(
        engine,
        BatchingLimits(max_batch_size=limit, max_queued_requests=1024, max_queued_per_tenant=1024),
    )
    scheduler.start()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model_dir, Path(tmp), ADAPTERS)
        ours = load_ours(engine, paths)
        peft = load_peft(model_dir, paths, engine.device)
    rows = prompts(REQUESTS)
    which = [i % ADAPTERS for i in range(REQUESTS)]
    batch = torch.tensor(rows, device=engine.device)
    generate = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False}
    generate["pad_token_id"] = engine.pad_token_id

    def peft_switch() -> None:
        for r, a in enumerate(which):
            peft.set_adapter(f"a{a}")
            peft.generate(input_ids=batch[r : r + 1], **generate)

    def peft_mixed() -> None:
        peft.generate(input_ids=batch, adapter_names=[f"a{a}" for a in which], **generate)

    variants = {
        "(a) peft-switch": peft_switch,
        "(b) peft-mixed": peft_mixed,
        "(c) loraplex": lambda: through_scheduler(scheduler, rows, [ours[a] for a in which]),
        "(d) base": lambda: through_scheduler(scheduler, rows, [None] * REQUESTS),
    }
    with torch.inference_mode():
        samples = interleaved(variants, ROUNDS)
    tokens = REQUESTS * NEW
    print(
        f"B1 throughput: {REQUESTS} requests over {ADAPTERS} adapters (ranks 8-16), "
        f"{PROMPT} prompt + {NEW} new tokens, {ROUNDS} interleaved rounds, "
        f"device {engine.device}, {torch.get_num_threads()} threads"
    )
    print(f"{'variant':<16} {'median s':>9} {'min-max s':>14} {'tokens/s':>9} {'(c) is':>8}")
    report = {}
    ours_ms = statistics.median(samples["(c) loraplex"])
    for name, values in samples.items():
        row = summarize(values)
        row["tokens_per_second"] = tokens / row["median_ms"] * 1000
        report[name] = row
        print(
            f"{name:<16} {row['median_ms'] / 1000:>9.2f} {row['min_ms'] / 1000:>6.2f}-"
            f"{row['max_ms'] / 1000:<7.2f} {row['tokens_per_second']:>9.0f} "
            f"{row['median_ms'] / ours_ms:>7.2f}x"
        )
    speed = {k: v["tokens_per_second"] for k, v in report.items()}
    ratios = {
        "(c) >= 0.85 x (d)": speed["(c) loraplex"] / speed["(d) base"],
        "(c) >= 1.3 x (b)": speed["(c) loraplex"] / speed["(b) peft-mixed"],
        "(c) >= 8 x (a)": speed["(c) loraplex"] / speed["(a) peft-switch"],
    }
    for target, ratio in ratios.items():
        verdict = "met" if ratio >= TARGETS[target] else "MISSED"
        print(f"target {target:<18} measured {ratio:5.2f}x  {verdict}")

    runs, counts = {}, {}
    for distinct in (1, 64, 256):
        adapters = synthetic(engine, ours, distinct)
        counts[distinct] = count = max(REQUESTS, distinct)
        picks = [adapters[i % distinct] for i in range(count)]
        runs[distinct] = partial(through_scheduler, scheduler, prompts(count), picks)
    with torch.inference_mode():
        by_distinct = interleaved(runs, ROUNDS)
    sweep = {}
    print(f"\n(c) by distinct adapters, {NEW} new tokens per request, {ROUNDS} rounds")
    print(f"{'distinct':>8} {'requests':>8} {'median s':>9} {'tokens/s':>9}")
    for distinct, values in by_distinct.items():
        row = summarize(values) | {"requests": counts[distinct]}
        row["tokens_per_second"] = counts[distinct] * NEW / row["median_ms"] * 1000
        sweep[str(distinct)] = row
        seconds, speed = row["median_ms"] / 1000, row["tokens_per_second"]
        print(f"{distinct:>8} {counts[distinct]:>8} {seconds:>9.2f} {speed:>9.0f}")
    scheduler.stop()
    meta = {"requests": REQUESTS, "adapters": ADAPTERS, "prompt": PROMPT, "new": NEW}
    write_json(
        "multi_adapter",
        meta | {"rounds": ROUNDS, "results": report, "ratios": ratios, "by_distinct": sweep},
    )


if __name__ == "__main__":
    main()
