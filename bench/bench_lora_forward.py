"""Mixed-adapter forward pass: loraplex's gathered batch vs PEFT, same model, same inputs.

One prefill forward over a batch whose rows use different adapters (ranks 8-16, targets
differing), measured three ways, interleaved, several rounds:
  loraplex      one pass, per-row factors gathered once, two bmm per layer (LoraBatch)
  peft-mixed    one pass, PEFT's adapter_names= (a Python loop over adapters in each layer)
  peft-switch   one pass per adapter group after set_adapter() (classic adapter switching)
Prints a table (median and min-max ms) and writes bench/results/lora_forward.json.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import interleaved, load_ours, load_peft, make_adapters, summarize, write_json
from services.inference.engine import Engine
from services.inference.settings import InferenceSettings

ADAPTERS, ROWS, SEQ, ROUNDS = 16, 64, 32, 5


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = InferenceSettings().model_dir
    engine = Engine(model_dir, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model_dir, Path(tmp), ADAPTERS)
        ours = load_ours(engine, paths)
        peft = load_peft(model_dir, paths, engine.device)

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
    with torch.inference_mode():
        samples = interleaved(variants, ROUNDS)

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
        report[name] = row = summarize(values)
        median = row["median_ms"]
        print(
            f"{name:<12} {median:>10.1f} {min(values):>7.1f}-{max(values):<8.1f} "
            f"{ROWS * SEQ / median * 1000:>10.0f} {median / base_ms:>11.2f}x"
        )
    meta = {"rows": ROWS, "seq": SEQ, "adapters": ADAPTERS, "rounds": ROUNDS}
    write_json("lora_forward", meta | {"results": report})


if __name__ == "__main__":
    main()
