"""The GPU check (`bench/gpu_check.sh`): one command that measures the engine on a machine.

With CUDA: the LoRA equivalence tests (loraplex against PEFT), then B1 (throughput, mixed
adapters, against PEFT) and B2 (latency under load) at Llama-3.2-1B's shape in bfloat16,
sized for under 8 minutes on one GPU. Without CUDA the same steps run on the CPU in float32
at a small shape (`llama-2x128`), so the path is exercised everywhere; `--size test`
shrinks every step further (the test suite runs that). Most of B1's set-up time is PEFT
loading its 256 adapters (it grows faster than linearly with their number);
`--b1="--distinct 1,16 ..."` and `--b2="..."` replace either benchmark's options. Prints a
table, then the whole result as one line of JSON (also written to
bench/results/gpu_check.json, or --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import bench_multi_adapter, bench_serving
from bench.common import write_json

REPO = Path(__file__).resolve().parent.parent
EQUIVALENCE_TESTS = [
    "tests/unit/test_lora_matches_peft.py",
    "tests/unit/test_lora_batch.py",
    "tests/unit/test_compose_matches_peft.py",
]

# (shape, dtype, B1 options, B2 options) per device, and for --size test.
PROFILES = {
    "cuda": (
        "llama-1b",
        "bfloat16",
        "--distinct 1,16,256 --ranks 8,16,32,64 --prompt 32 --new 32 --rounds 2 "
        "--switch-requests 8",
        "--distinct 16 --clients 32 --per-client 2 --prompt 32 --new 32 --rounds 2",
    ),
    "cpu": (
        "llama-2x128",
        "float32",
        "--distinct 1,16,256 --ranks 8,16,32,64 --prompt 16 --new 16 --rounds 3 "
        "--switch-requests 16",
        "--distinct 16 --clients 16 --per-client 2 --prompt 16 --new 16 --rounds 3",
    ),
}
TEST_SIZE = (
    "llama-2x128",
    "float32",
    "--distinct 1,4 --ranks 8,16 --requests 4 --batch 4 --prompt 4 --new 3 --rounds 1 "
    "--switch-requests 2",
    "--distinct 3 --clients 3 --per-client 1 --prompt 4 --new 3 --rounds 1",
)


def run_tests(files: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    return {
        "files": files,
        "passed": done.returncode == 0,
        "summary": lines[-1] if lines else done.stderr.strip()[-500:],
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh")
    parser.add_argument("--size", choices=("full", "test"), default="full")
    parser.add_argument("--out", default="gpu_check", help="results name")
    parser.add_argument("--b1", help="B1's options instead of the profile's (quoted)")
    parser.add_argument("--b2", help="B2's options instead of the profile's (quoted)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape, dtype, b1, b2 = TEST_SIZE if args.size == "test" else PROFILES[device]
    b1, b2 = args.b1 or b1, args.b2 or b2
    common = ["--shape", shape, "--device", device, "--dtype", dtype]
    began = time.perf_counter()
    # The test size runs one equivalence file: the suite runs all of them anyway.
    tests = run_tests(EQUIVALENCE_TESTS[1:2] if args.size == "test" else EQUIVALENCE_TESTS)
    started = time.perf_counter()
    throughput = bench_multi_adapter.main([*common, *b1.split(), "--out", f"{args.out}-b1"])
    b1_seconds = time.perf_counter() - started
    started = time.perf_counter()
    latency = bench_serving.main([*common, *b2.split(), "--out", f"{args.out}-b2"])
    b2_seconds = time.perf_counter() - started
    result = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "device": device,
        "dtype": dtype,
        "shape": shape,
        "size": args.size,
        "equivalence_tests": tests,
        "b1": throughput,
        "b2": latency,
        "seconds": {
            "tests": tests["seconds"],
            "b1": b1_seconds,
            "b2": b2_seconds,
            "total": time.perf_counter() - began,
        },
    }
    print_table(result)
    write_json(args.out, result)
    print(json.dumps(result))
    return 0 if tests["passed"] else 1


def print_table(result: dict) -> None:
    print(
        f"\nGPU check: {result['gpu'] or 'no GPU (CPU fallback)'}, shape {result['shape']}, "
        f"{result['dtype']}, {result['seconds']['total']:.0f} s"
    )
    tests = result["equivalence_tests"]
    print(f"equivalence tests: {'passed' if tests['passed'] else 'FAILED'} ({tests['summary']})")
    same = result["b1"]["agreement"]
    print(
        f"loraplex vs PEFT logits: max difference {same['max_abs_logit_diff']:.2g}, "
        f"top-1 agreement {same['top1_agreement']:.1%}"
    )
    print(
        f"{'distinct':>8} {'loraplex tok/s':>15} {'base tok/s':>11} {'PEFT mixed':>11} "
        f"{'PEFT switch':>12} {'vs base':>8} {'vs mixed':>9} {'vs switch':>10} "
        f"{'KV MiB':>7} {'stacks MiB':>11}"
    )
    for distinct, run in result["b1"]["by_distinct"].items():
        v = {name.split(" ")[1]: row for name, row in run["variants"].items()}
        ours = v["loraplex"]["tokens_per_second"]
        print(
            f"{distinct:>8} {ours:>15.0f} {v['base']['tokens_per_second']:>11.0f} "
            f"{v['peft-mixed']['tokens_per_second']:>11.0f} "
            f"{v['peft-switch']['tokens_per_second']:>12.0f} "
            f"{ours / v['base']['tokens_per_second']:>7.2f}x "
            f"{ours / v['peft-mixed']['tokens_per_second']:>8.2f}x "
            f"{ours / v['peft-switch']['tokens_per_second']:>9.2f}x "
            f"{v['loraplex']['peak_kv_cache_bytes'] / 2**20:>7.1f} "
            f"{v['loraplex']['peak_lora_stacks_bytes'] / 2**20:>11.1f}"
        )
    print(f"{'B2':>8} {'p50 ms':>8} {'p99 ms':>8} {'first token p50 ms':>19}")
    for name, row in result["b2"]["b2"].items():
        print(
            f"{name:>8} {row['p50_ms']:>8.0f} {row['p99_ms']:>8.0f} "
            f"{row['first_token_p50_ms']:>19.0f}"
        )


if __name__ == "__main__":
    sys.exit(main())
