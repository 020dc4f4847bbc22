"""Federation of LoRA adapters, measured: `python -m bench bench_federation`.

Trains one local adapter per demo tenant (the same LoRA shape for all: r 8 on q_proj and
v_proj, TRL's SFTTrainer on the tenant's own dialogs, unequal sample counts), federates them
with each method, and prints
  1. the relative error ||dW_agg - weighted mean dW||_F / ||weighted mean dW||_F per method,
  2. held-out loss (mean per-token NLL on each tenant's held-out dialogs) of the base model,
     each local adapter and each federated adapter,
  3. training throughput (tokens/s) on the default model on this machine.
Writes bench/results/bench_federation.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import RESULTS
from models import corpus
from models.common import mean_loss
from services import FederationConfig, LoRAFederation
from services.training import trainer
from services.training.data import Splits
from services.training.federation import LoraAdapter
from services.training.params import Method, resolve_params
from services.training.settings import TrainingSettings

TENANTS = ("retailer", "bank", "airline")
SAMPLES = {"retailer": 400, "bank": 200, "airline": 100}  # training dialogs each: the weights
STEPS, HELDOUT_DOCS = 40, 60


def train_local(settings, tenant: str, out: Path) -> tuple[Path, dict]:
    docs = corpus.read_split(tenant, "train")[: SAMPLES[tenant]]
    held = corpus.read_split(tenant, "heldout")[:16]
    params = resolve_params(
        {"max_steps": STEPS, "batch_size": 8, "learning_rate": 2e-3, "append_eos": True},
        settings,
    )
    spec = trainer.RunSpec(
        model_dir=settings.model_dir,
        job_dir=out / tenant,
        method=Method.SFT,
        params=params,
        splits=Splits([{"text": d} for d in docs], [{"text": d} for d in held]),
        checkpoint_steps=10_000,
        base_model_name=settings.model_dir.name,
    )
    result = trainer.run(spec, trainer.Hooks())
    return out / tenant / "adapter", result.record


def heldout_losses(settings, tok, adapter_dir: Path | None) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return {
        t: mean_loss(model, tok, corpus.read_split(t, "heldout")[:HELDOUT_DOCS]) for t in TENANTS
    }


def main() -> None:
    torch.manual_seed(0)
    settings = TrainingSettings(_env_file=None)
    tok = AutoTokenizer.from_pretrained(settings.model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-federation-"))
    try:
        local, records = {}, {}
        for tenant in TENANTS:
            started = time.perf_counter()
            local[tenant], records[tenant] = train_local(settings, tenant, work)
            print(
                f"trained {tenant}: {records[tenant]['steps']} steps, "
                f"{records[tenant]['tokens_per_second']:.0f} tokens/s, "
                f"{time.perf_counter() - started:.0f}s",
                flush=True,
            )
        adapters = [LoraAdapter.from_dir(local[t]) for t in TENANTS]
        samples = [SAMPLES[t] for t in TENANTS]
        methods = {
            "fedavg": FederationConfig("fedavg"),
            "stack": FederationConfig("stack"),
            **{f"svd r={r}": FederationConfig("svd", rank=r) for r in (2, 4, 8, 16)},
        }
        errors, federated = {}, {}
        for name, config in methods.items():
            merged = LoRAFederation(config).aggregate(adapters, samples)
            errors[name] = merged.relative_error
            federated[name] = merged.save(work / "federated" / name.replace(" ", "_"))
        losses = {"base": heldout_losses(settings, tok, None)}
        for tenant in TENANTS:
            losses[f"local {tenant}"] = heldout_losses(settings, tok, local[tenant])
        for name, path in federated.items():
            losses[name] = heldout_losses(settings, tok, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        "\nrelative error of the aggregate (weights "
        + ", ".join(f"{t} {n / sum(samples):.3f}" for t, n in zip(TENANTS, samples, strict=True))
        + ")"
    )
    for name, error in errors.items():
        print(f"  {name:<10} {error:.3e}")
    print("\nheld-out loss     " + "".join(f"{t:>10}" for t in TENANTS) + "      mean")
    for name, row in losses.items():
        values = [row[t] for t in TENANTS]
        print(f"  {name:<16}" + "".join(f"{v:10.4f}" for v in values) + f"{sum(values) / 3:10.4f}")
    throughput = {t: records[t]["tokens_per_second"] for t in TENANTS}
    print(
        "\ntraining throughput (tokens/s): "
        + ", ".join(f"{t} {v:.0f}" for t, v in throughput.items())
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_federation.json").write_text(
        json.dumps(
            {
                "samples": SAMPLES,
                "steps": STEPS,
                "relative_error": errors,
                "heldout_loss": losses,
                "tokens_per_second": throughput,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
