"""Train one LoRA adapter per demo tenant on models/loraplex-tiny/ into models/adapters/<tenant>/.

    python -m models.build_adapters [--steps 150]

The adapters are deliberately heterogeneous (ranks and target modules differ) so the serving
engine has to handle mixed shapes. Afterwards prints and saves the held-out loss table
(models/adapters/eval.json) and a few greedy samples.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import corpus
from models.common import (
    ADAPTERS_DIR,
    BASE_DIR,
    MODEL_NAME,
    SEED,
    encode,
    greedy,
    mean_loss,
    packed_batches,
    setup_torch,
    train,
)

ADAPTERS: dict[str, dict] = {
    "retailer": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "bank": {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "airline": {
        "r": 8,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    },
}
SEQ_LEN, BATCH, LR = 256, 8, 2e-3
SAMPLE_PROMPTS = {
    "retailer": ["Where is my order 4821?", "Can I return a sweater that doesn't fit?"],
    "bank": ["I lost my debit card.", "What is the interest rate on a car loan?"],
    "airline": ["Is flight SK 212 on time?", "How many bags can I check?"],
}


def load(adapter: str | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, ADAPTERS_DIR / adapter)
    return model.eval()


def build_adapter(tenant: str, tok, steps: int) -> float:
    torch.manual_seed(SEED)  # same LoRA init and data order on every rebuild
    spec = ADAPTERS[tenant]
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec["r"],
        lora_alpha=2 * spec["r"],
        lora_dropout=0.0,
        bias="none",
        target_modules=spec["target_modules"],
    )
    model = get_peft_model(load(), config)
    model.print_trainable_parameters()
    seqs = encode(tok, corpus.read_split(tenant, "train"))
    batches = packed_batches(seqs, BATCH, SEQ_LEN, random.Random(SEED))
    seconds = train(model, batches, steps, lr=LR, warmup=10, log_every=50)
    # A stable name instead of the local path, so serving can match adapters to base models.
    model.peft_config["default"].base_model_name_or_path = MODEL_NAME
    out = ADAPTERS_DIR / tenant
    model.save_pretrained(out, save_embedding_layers=False)  # False: no hub lookup of the name
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card stub
    # PEFT writes target_modules from a set (order follows the hash seed): sort for stable files.
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return seconds


def evaluate(tok) -> dict[str, dict[str, float]]:
    """Mean per-token held-out loss: {model: {tenant split: loss}}."""
    heldout = {t: corpus.read_split(t, "heldout") for t in corpus.TENANT_NAMES}
    table = {}
    for name in ("base", *corpus.TENANT_NAMES):
        model = load(None if name == "base" else name)
        table[name] = {t: round(mean_loss(model, tok, docs), 4) for t, docs in heldout.items()}
        if name != "base":
            for prompt in SAMPLE_PROMPTS[name]:
                print(
                    f"  [{name}] Customer: {prompt}\n           Agent:"
                    f"{greedy(model, tok, f'Customer: {prompt}' + chr(10) + 'Agent:')}"
                )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    setup_torch()
    tok = AutoTokenizer.from_pretrained(BASE_DIR)
    minutes = {}
    for tenant in ADAPTERS:
        print(f"adapter {tenant}: {ADAPTERS[tenant]}")
        minutes[tenant] = round(build_adapter(tenant, tok, args.steps) / 60, 2)
    t0 = time.time()
    table = evaluate(tok)
    print(f"evaluated in {time.time() - t0:.0f}s")
    print("held-out loss   " + "".join(f"{t:>10}" for t in corpus.TENANT_NAMES))
    for name, row in table.items():
        print(f"{name:<16}" + "".join(f"{row[t]:10.3f}" for t in corpus.TENANT_NAMES))
    (ADAPTERS_DIR / "eval.json").write_text(
        json.dumps({"heldout_loss": table, "train_minutes": minutes, "steps": args.steps}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
