"""What the benchmarks share: synthetic PEFT adapters, interleaved timing, table and JSON."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from services.inference.engine import Engine
from services.inference.lora import LoraWeights, parse_adapter

RESULTS = Path(__file__).parent / "results"
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj"]]


def make_adapters(model_dir: Path, out: Path, count: int) -> list[Path]:
    """Real PEFT adapters with random (non-zero) factors, ranks 8-16, different targets."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        rank = 8 + (i % 3) * 4
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS[i % 3], init_lora_weights=False
        )
        path = out / f"a{i}"
        model = get_peft_model(base, config)
        model.save_pretrained(path)
        base = model.unload()  # the same base again, without this adapter's layers
        paths.append(path)
    return paths


def load_ours(engine: Engine, paths: list[Path]) -> list[LoraWeights]:
    return [
        parse_adapter(
            (p / "adapter_config.json").read_bytes(),
            (p / "adapter_model.safetensors").read_bytes(),
            engine.linear_shapes,
            dtype=engine.dtype,
            device=engine.device,
        )
        for p in paths
    ]


def load_peft(model_dir: Path, paths: list[Path], device: torch.device) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    # The model's chat stop strings would make generate() search text at every step (and
    # demand a tokenizer); the benchmarks generate a fixed number of tokens instead.
    base.generation_config.stop_strings = None
    peft = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], start=1):
        peft.load_adapter(p, adapter_name=f"a{i}")
    return peft.eval()


def timed(fn: Callable[[], object]) -> float:
    """Milliseconds fn takes (synchronising CUDA, so GPU work is counted)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """One warm-up each, then A B C A B C ...: slow drifts of a shared machine hit all alike."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(timed(fn))
    return samples


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def machine() -> dict[str, object]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine()} | payload, indent=2))
    return path
