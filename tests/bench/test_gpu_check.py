"""bench/gpu_check.sh's CPU path (no GPU here): it runs, and its table and JSON say what
it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.shapes import SHAPES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_runs_on_cpu_and_reports_tests_throughput_latency_and_memory():
    done = subprocess.run(
        ["bench/gpu_check.sh", "--size", "test", "--out", "test-gpu-check"],
        cwd=REPO,
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert any("no GPU (CPU fallback), shape llama-2x128, float32" in line for line in lines)
    assert any(line.startswith("equivalence tests: passed") for line in lines)
    result = json.loads(lines[-1])
    assert (result["device"], result["dtype"], result["gpu"]) == ("cpu", "float32", None)
    assert result["equivalence_tests"]["passed"]
    assert " passed" in result["equivalence_tests"]["summary"]

    shape = SHAPES["llama-2x128"]
    layers, kv_heads, head_dim = (
        shape["num_hidden_layers"],
        shape["num_key_value_heads"],
        shape["head_dim"],
    )
    per_token = 2 * layers * kv_heads * head_dim * 4  # keys and values, float32
    b1 = result["b1"]
    # float32 on CPU: loraplex and PEFT compute the same logits.
    assert b1["agreement"]["max_abs_logit_diff"] <= 1e-4
    assert b1["agreement"]["top1_agreement"] == 1.0
    assert set(b1["by_distinct"]) == {"1", "4"}
    for distinct, run in b1["by_distinct"].items():
        variants = run["variants"]
        assert set(variants) == {"(a) peft-switch", "(b) peft-mixed", "(c) loraplex", "(d) base"}
        assert all(v["tokens_per_second"] > 0 for v in variants.values())
        for name in ("(c) loraplex", "(d) base"):
            kv = variants[name]["peak_kv_cache_bytes"]
            # At least one request's whole cache (prompt + all new tokens but the last),
            # whole tokens of it, at most every row's with a few columns of padding.
            full = b1["prompt"] + b1["new"] - 1
            assert kv % per_token == 0 and full * per_token <= kv
            assert kv <= b1["requests"] * (full + b1["new"]) * per_token
        assert variants["(d) base"]["peak_lora_stacks_bytes"] == 0
        stacks = variants["(c) loraplex"]["peak_lora_stacks_bytes"]
        assert (stacks > 0) == (distinct != "1")  # one adapter needs no stacks
    b2 = result["b2"]["b2"]
    assert set(b2) == {"loraplex", "base"}
    for row in b2.values():
        assert 0 < row["first_token_p50_ms"] <= row["p99_ms"]
        assert row["p50_ms"] <= row["p99_ms"]
