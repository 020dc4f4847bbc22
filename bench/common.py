"""What the benchmarks share: synthetic PEFT adapters, interleaved timing, table and JSON."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from services.inference.engine import Engine
from services.inference.lora import LoraWeights, parse_adapter
from services.inference.lora_batch import LoraBatch

RESULTS = Path(__file__).parent / "results"
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj"]]


def make_adapters(
    model_dir: Path, out: Path, count: int, ranks: Sequence[int] = (8, 12, 16)
) -> list[Path]:
    """`count` real PEFT adapters with random (non-zero) factors: adapter i has rank
    ranks[i % len(ranks)] and targets TARGETS[i % 3]. PEFT wraps the base once per (rank,
    targets) pair and saves each adapter of that pair with fresh seeded factors."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pairs: dict[tuple[int, int], list[int]] = {}
    for i in range(count):
        pairs.setdefault((ranks[i % len(ranks)], i % len(TARGETS)), []).append(i)
    paths = [out / f"a{i}" for i in range(count)]
    for (rank, targets), members in pairs.items():
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS[targets], init_lora_weights=False
        )
        model = get_peft_model(base, config)
        factors = [p for name, p in model.named_parameters() if "lora_" in name]
        for i in members:
            generator = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for factor in factors:
                    std = factor.shape[1] ** -0.5  # keeps x·Aᵀ·Bᵀ of the size of x
                    factor.copy_(torch.randn(factor.shape, generator=generator) * std)
            model.save_pretrained(paths[i])
        base = model.unload()  # the same base again, without this pair's layers
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


def load_peft(
    model_dir: Path, paths: list[Path], device: torch.device, dtype: torch.dtype = torch.float32
) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    # The model's chat stop strings would make generate() search text at every step (and
    # demand a tokenizer); the benchmarks generate a fixed number of tokens instead.
    base.generation_config.stop_strings = None
    # low_cpu_mem_usage: each adapter's layers are created empty and filled from its
    # file, not initialised first (hundreds of adapters of a 1B model load in seconds).
    peft = PeftModel.from_pretrained(base, paths[0], adapter_name="a0", low_cpu_mem_usage=True)
    for i, p in enumerate(paths[1:], start=1):
        peft.load_adapter(p, adapter_name=f"a{i}", low_cpu_mem_usage=True)
    return peft.eval()


class MeasuredEngine(Engine):
    """The engine, recording the largest KV cache and LoRA stacks its passes held."""

    peak_kv_bytes = 0
    peak_lora_bytes = 0

    def forward(self, input_ids, attention_mask, position_ids, cache, lora: LoraBatch):
        logits, cache = super().forward(input_ids, attention_mask, position_ids, cache, lora)
        kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        self.peak_kv_bytes = max(self.peak_kv_bytes, kv)
        self.peak_lora_bytes = max(self.peak_lora_bytes, lora.nbytes)
        return logits, cache

    def reset_peaks(self) -> None:
        self.peak_kv_bytes = self.peak_lora_bytes = 0


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
