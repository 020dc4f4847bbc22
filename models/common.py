"""Helpers shared by the build scripts and tests: paths, packing, training loop, evaluation."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).parent
BASE_DIR = ROOT / "loraplex-tiny"
ADAPTERS_DIR = ROOT / "adapters"
MODEL_NAME = "loraplex-tiny"
SEED = 0


def setup_torch(seed: int = SEED) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def encode(tok, docs: Iterable[str]) -> list[list[int]]:
    """Token ids per document: the tokenizer prepends <s>; we append </s>."""
    return [[*ids, tok.eos_token_id] for ids in tok(list(docs))["input_ids"]]


def packed_batches(
    seqs: list[list[int]], batch: int, seq_len: int, rng: random.Random
) -> Iterator[torch.Tensor]:
    """Endless [batch, seq_len] blocks of concatenated documents, reshuffled every epoch."""
    buf: list[int] = []
    rows: list[list[int]] = []
    while True:
        for i in rng.sample(range(len(seqs)), len(seqs)):
            buf.extend(seqs[i])
            while len(buf) >= seq_len:
                rows.append(buf[:seq_len])
                buf = buf[seq_len:]
                if len(rows) == batch:
                    yield torch.tensor(rows)
                    rows = []


def train(
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    warmup: int = 20,
    weight_decay: float = 0.0,
    log_every: int = 25,
) -> float:
    """AdamW with linear warmup and cosine decay to 10% of ``lr``; returns wall time in s."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = running / ((step % log_every) + 1)
            print(f"  step {step + 1:4d}/{steps}  loss {mean:.3f}  {time.time() - start:6.0f}s")
            running = 0.0
    model.eval()
    return time.time() - start


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tok, docs: list[str], batch_size: int = 16) -> float:
    """Mean per-token negative log-likelihood of ``docs`` (each scored independently)."""
    model.eval()
    seqs = encode(tok, docs)
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += int((targets != -100).sum())
    return total / count


@torch.no_grad()
def greedy(model: torch.nn.Module, tok, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of ``prompt``, cut at the end of the agent's turn."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        tokenizer=tok,  # for the stop strings in generation_config.json
    )
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text.split("\n")[0]
