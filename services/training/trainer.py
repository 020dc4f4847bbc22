"""One training run: TRL's SFTTrainer or DPOTrainer on a PEFT LoRA adapter of the base model.

Runs in a worker thread (blocking). Checkpoints (the Trainer's own: adapter weights as
safetensors, optimizer, scheduler and RNG state) go to <job dir>/checkpoints every
`checkpoint_steps`; a run started again on the same job directory resumes from the last
one. The Trainer reads its optimizer/scheduler/RNG files back with torch.load(weights_only=
True); those files are written by this service's own workers, never uploaded. Adapters are
read and written as safetensors only.

Progress goes to `hooks.report` after every optimizer step; `hooks.should_stop()` is asked
after every step (cancelled, or the worker lost its lease) and stops the run there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.training.data import Splits
from services.training.params import Method, TrainingParams

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class RunSpec:
    model_dir: Path
    job_dir: Path
    method: Method
    params: TrainingParams
    splits: Splits
    checkpoint_steps: int
    # A PEFT adapter directory to continue from (None: a fresh LoRA adapter).
    init_dir: Path | None = None
    base_model_name: str = ""


@dataclass
class Hooks:
    report: Callable[[dict[str, Any]], None] = lambda progress: None
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class RunResult:
    stopped: bool  # should_stop() ended it early: nothing to register
    files: dict[str, bytes] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


COMPLETE = "checkpoint-complete"  # written once the Trainer has saved a whole checkpoint


def last_checkpoint(job_dir: Path) -> Path | None:
    """The newest complete checkpoint: a worker killed while saving leaves a partial
    directory behind (transformers' get_last_checkpoint would pick that one)."""
    checkpoints = job_dir / "checkpoints"
    if not checkpoints.is_dir():
        return None
    complete = [
        (int(d.name.removeprefix("checkpoint-")), d)
        for d in checkpoints.glob("checkpoint-*")
        if d.name.removeprefix("checkpoint-").isdigit() and (d / COMPLETE).exists()
    ]
    return max(complete)[1] if complete else None


def _progress_callback(hooks: Hooks, started: float):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Reports after each logged step (the Trainer logs after on_step_end)."""

        def __init__(self) -> None:
            self.tokens = 0.0  # tokens this run processed (a resumed run counts from 0)
            self.first_step: int | None = None
            self.eval_loss: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.first_step is None:
                self.first_step = state.global_step - 1
            if hooks.should_stop():
                control.should_training_stop = True
                control.should_save = False
            return control

        def on_save(self, args, state, control, **kwargs):
            # Called after _save_checkpoint returned: every file of it is written.
            marker = Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE
            if marker.parent.is_dir():
                with open(marker, "w") as f:
                    f.flush()
                    os.fsync(f.fileno())

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "num_tokens" in logs:
                self.tokens = float(logs["num_tokens"])
            if "loss" not in logs:
                return
            done = state.global_step - (self.first_step or 0)
            elapsed = max(time.perf_counter() - started, 1e-9)
            total = state.max_steps
            progress = {
                "step": state.global_step,
                "total_steps": total,
                "epoch": float(state.epoch or 0.0),
                "loss": float(logs["loss"]),
                "tokens_per_second": self.tokens / elapsed,
                "eta_seconds": max(total - state.global_step, 0) * elapsed / max(done, 1),
            }
            if self.eval_loss is not None:
                progress["eval_loss"] = self.eval_loss
            hooks.report(progress)

    return Progress()


def run(spec: RunSpec, hooks: Hooks) -> RunResult:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = spec.params
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    peft_config = None
    if spec.init_dir is not None:
        model = PeftModel.from_pretrained(model, spec.init_dir, is_trainable=True)
    else:
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=p.rank,
            lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            target_modules=list(p.target_modules),
            bias="none",
        )
    common: dict[str, Any] = {
        "output_dir": str(spec.job_dir / "checkpoints"),
        "learning_rate": p.learning_rate,
        "num_train_epochs": p.epochs,
        "max_steps": p.max_steps or -1,
        "per_device_train_batch_size": p.batch_size,
        "per_device_eval_batch_size": p.batch_size,
        "seed": p.seed,
        "data_seed": p.seed,
        "save_strategy": "steps",
        "save_steps": spec.checkpoint_steps,
        "save_total_limit": 2,
        "logging_steps": 1,
        "eval_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
        "max_length": p.max_length,
    }
    train_rows, eval_rows = spec.splits.train, spec.splits.heldout
    if spec.method is Method.SFT and not p.append_eos and "messages" not in train_rows[0]:
        train_rows = _tokenized(train_rows, tokenizer, p.max_length)
        eval_rows = _tokenized(eval_rows, tokenizer, p.max_length)
    train_set = Dataset.from_list(train_rows)
    eval_set = Dataset.from_list(eval_rows)
    if spec.method is Method.DPO:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(beta=p.dpo_beta, **common),
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    resume = last_checkpoint(spec.job_dir)
    eval_before = float(trainer.evaluate()["eval_loss"])
    callback = _progress_callback(hooks, time.perf_counter())
    callback.eval_loss = eval_before
    trainer.add_callback(callback)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    steps = trainer.state.global_step
    if hooks.should_stop() or (trainer.state.max_steps and steps < trainer.state.max_steps):
        return RunResult(stopped=True)
    eval_after = float(trainer.evaluate()["eval_loss"])
    duration = time.perf_counter() - started
    train_seconds = float(output.metrics.get("train_runtime", duration))
    files = _save_adapter(
        trainer.model, spec.job_dir / "adapter", spec.model_dir, spec.base_model_name
    )
    config = json.loads(files[CONFIG_FILE])
    params = p.to_dict()
    params.update(
        rank=int(config["r"]),
        lora_alpha=float(config["lora_alpha"]),
        target_modules=sorted(config["target_modules"]),
    )
    record = {
        "params": params,
        "train_loss": float(output.training_loss),
        "eval_loss_before": eval_before,
        "eval_loss": eval_after,
        "steps": steps,
        # Tokens the last run processed (after a resumption: since the checkpoint).
        "train_tokens": int(callback.tokens),
        "tokens_per_second": callback.tokens / max(train_seconds, 1e-9),
        "duration_seconds": duration,
        "resumed_from_step": int(resume.name.rsplit("-", 1)[1]) if resume else 0,
    }
    return RunResult(stopped=False, files=files, record=record)


def _tokenized(rows: list[dict[str, Any]], tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Rows tokenized as TRL's SFTTrainer would, without the EOS it appends: TRL takes
    pre-tokenized rows (input_ids, and completion_mask for the loss) as they are."""
    out = []
    for row in rows:
        if "text" in row:
            ids = tokenizer(row["text"])["input_ids"][:max_length]
            out.append({"input_ids": ids})
            continue
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        ids = (prompt + completion)[:max_length]
        mask = ([0] * len(prompt) + [1] * len(completion))[:max_length]
        out.append({"input_ids": ids, "completion_mask": mask})
    return out


def _save_adapter(model, out: Path, model_dir: Path, base_model_name: str) -> dict[str, bytes]:
    """PEFT's save_pretrained (safetensors), with a stable base model name and sorted
    target modules (PEFT writes them from a set)."""
    for config in model.peft_config.values():
        # the local directory while saving: a bare name would send PEFT to look it up online
        config.base_model_name_or_path = str(model_dir)
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    config_path = out / CONFIG_FILE
    config = json.loads(config_path.read_text())
    if base_model_name:
        config["base_model_name_or_path"] = base_model_name
    config["target_modules"] = sorted(config["target_modules"])
    config["inference_mode"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {CONFIG_FILE: config_path.read_bytes(), WEIGHTS_FILE: (out / WEIGHTS_FILE).read_bytes()}
