"""Mixed-adapter forward pass: loraplex's gathered batch vs PEFT, same model, same inputs.

One prefill forward over a batch whose rows use different adapters (ranks 8-16, targets
differing), measured three ways, interleaved, several rounds:
  loraplex      one pass, per-row factors gathered once, two bmm per layer (LoraBatch)
  peft-mixed    one pass, PEFT's adapter_names= (a Python loop over adapters in each layer)
  peft-switch   one pass per adapter group after set_adapter() (classic adapter switching)
Prints a table (median and min-max ms) and writes bench/results/lora_forward.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from services.inference.engine import Engine
from services.inference.lora import parse_adapter
from services.inference.settings import InferenceSettings

ADAPTERS, ROWS, SEQ, ROUNDS = 16, 64, 32, 5
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj"]]
RESULTS = Path(__file__).parent / "results"


def make_adapters(model_dir: Path, out: Path) -> list[Path]:
    """Real PEFT adapters with random (non-zero) factors, ranks 8-16, different targets."""
    paths = []
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        rank = 8 + (i % 3) * 4
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS[i % 3], init_lora_weights=False
        )
        path = out / f"a{i}"
        get_peft_model(base, config).save_pretrained(path)
        paths.append(path)
    return paths


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = InferenceSettings().model_dir
    engine = Engine(model_dir, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model_dir, Path(tmp))
        ours = [
            parse_adapter(
                (p / "adapter_config.json").read_bytes(),
                (p / "adapter_model.safetensors").read_bytes(),
                engine.linear_shapes,
                dtype=torch.float32,
            )
            for p in paths
        ]
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
        for i, p in enumerate(paths[1:], start=1):
            peft.load_adapter(p, adapter_name=f"a{i}")
        peft.eval()

    rows = [i % ADAPTERS for i in range(ROWS)]
    ids = torch.randint(3, 3000, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
    groups = {a: [r for r, x in enumerate(rows) if x == a] for a in set(rows)}

    def run_ours():
        with engine.adapters([ours[a] for a in rows]):
            engine.model(input_ids=ids)

    def run_peft_mixed():
        peft(input_ids=ids, adapter_names=[f"a{a}" for a in rows])

    def run_peft_switch():
        for a, members in groups.items():
            peft.set_adapter(f"a{a}")
            peft(input_ids=ids[members])

    variants = {"loraplex": run_ours, "peft-mixed": run_peft_mixed, "peft-switch": run_peft_switch}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(ROUNDS):  # interleaved: A B C A B C ...
            for name, fn in variants.items():
                samples[name].append(timed(fn))

    base_ms = statistics.median(samples["loraplex"])
    print(
        f"mixed-adapter prefill: {ROWS} rows x {SEQ} tokens over {ADAPTERS} adapters "
        f"(ranks 8-16), {ROUNDS} interleaved rounds, {torch.get_num_threads()} threads"
    )
    print(
        f"{'variant':<12} {'median ms':>10} {'min-max ms':>16} {'tokens/s':>10} {'vs loraplex':>12}"
    )
    report = {}
    for name, values in samples.items():
        median = statistics.median(values)
        report[name] = {"median_ms": median, "min_ms": min(values), "max_ms": max(values)}
        print(
            f"{name:<12} {median:>10.1f} {min(values):>7.1f}-{max(values):<8.1f} "
            f"{ROWS * SEQ / median * 1000:>10.0f} {median / base_ms:>11.2f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "rows": ROWS,
        "seq": SEQ,
        "adapters": ADAPTERS,
        "rounds": ROUNDS,
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    (RESULTS / "lora_forward.json").write_text(json.dumps({**meta, "results": report}, indent=2))


if __name__ == "__main__":
    main()
