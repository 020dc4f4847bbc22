"""What the active-learning evaluations share: the demo tenants' dialogues as (prompt,
reference) turns, word-level F1, and one-line answers of the demo model (greedy with token
statistics, K seeded samples, and many prompts batched)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from services.activelearning.settings import ActiveLearningSettings
from services.inference.decoding import sample_token
from services.inference.engine import Engine
from services.inference.lora import LoraWeights, parse_adapter

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "loraplex-tiny"
MAX_TOKENS = 48
# The service's defaults, so that evaluations sample as it does.
SAMPLE_COUNT = ActiveLearningSettings.model_fields["sample_count"].default
SAMPLE_TEMPERATURE = ActiveLearningSettings.model_fields["sample_temperature"].default
_WORD = re.compile(r"[a-z0-9$%.]+")


def words(text: str) -> list[str]:
    return [w.strip(".") for w in _WORD.findall(text.lower()) if w.strip(".")]


def f1(output: str, reference: str) -> float:
    """SQuAD-style word F1 on lowercased words."""
    out, ref = words(output), words(reference)
    common = sum((Counter(out) & Counter(ref)).values())
    if not out or not ref or not common:
        return 0.0
    precision, recall = common / len(out), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def turns(dialogues: list[str]) -> list[tuple[str, str]]:
    """(prompt, reference) for every agent line: the conversation up to it, then "Agent:"."""
    out = []
    for dialogue in dialogues:
        lines = dialogue.strip().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Agent:"):
                prompt = "\n".join(lines[:i]) + "\nAgent:"
                out.append((prompt, line.removeprefix("Agent:").strip()))
    return out


def load_adapter(engine: Engine, config: bytes, weights: bytes) -> LoraWeights:
    return parse_adapter(
        config, weights, engine.linear_shapes, dtype=engine.dtype, device=engine.device
    )


def load_adapter_dir(engine: Engine, directory: Path) -> LoraWeights:
    return load_adapter(
        engine,
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
    )


def _one_line(engine: Engine, tokens: list[int]) -> tuple[str, bool]:
    """The text of these tokens up to its first newline, and whether it ended there."""
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    if "\n" in text:
        return text[: text.index("\n")].strip(), True
    return text.strip(), False


@torch.inference_mode()
def greedy_with_stats(
    engine: Engine, prompt: str
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Greedy, one line: (text, chosen log-probs, entropies, exact top-1/top-2 margins)."""
    ids = torch.tensor([engine.encode(prompt)])
    cache, tokens, lps, ents, margins = None, [], [], [], []
    text = ""
    for _ in range(MAX_TOKENS):
        out = engine.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        token = int(torch.argmax(logp))
        p = logp.exp()
        top2 = torch.topk(p, 2).values
        if token == engine.eos_token_id:
            break
        lps.append(float(logp[token]))
        ents.append(float(-(p * logp).sum()))
        margins.append(float(top2[0] - top2[1]))
        tokens.append(token)
        text, ended = _one_line(engine, tokens)
        if ended:
            break
        ids = torch.tensor([[token]])
    return text.strip(), np.array(lps), np.array(ents), np.array(margins)


def sample_answers(
    engine: Engine,
    prompts: list[str],
    k: int = SAMPLE_COUNT,
    adapter: LoraWeights | None = None,
    temperature: float = SAMPLE_TEMPERATURE,
    batch: int = 40,
) -> list[list[str]]:
    """k one-line answers sampled per prompt, row i of a prompt with seed i + 1 (as the
    active-learning service asks the inference service for its samples); many prompts'
    rows share each batch."""
    rows = [p for p in prompts for _ in range(k)]
    seeds = [i + 1 for _ in prompts for i in range(k)]
    flat = decode(engine, rows, adapter, batch=batch, temperature=temperature, seeds=seeds)
    return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


def greedy_answers(
    engine: Engine, prompts: list[str], adapter: LoraWeights | None, batch: int = 32
) -> list[str]:
    """Greedy one-line answers to many prompts, `batch` at a time."""
    return decode(engine, prompts, adapter, batch=batch)


@torch.inference_mode()
def decode(
    engine: Engine,
    prompts: list[str],
    adapter: LoraWeights | None,
    *,
    batch: int,
    temperature: float = 0.0,
    seeds: list[int] | None = None,
) -> list[str]:
    """One-line answers, `batch` prompts at a time (left-padded): greedy at temperature 0,
    else sampled with a generator per row seeded with seeds[row]."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = [engine.encode(p) for p in prompts[start : start + batch]]
        rows, longest = len(chunk), max(len(c) for c in chunk)
        generators = [
            torch.Generator().manual_seed(seeds[start + r] if seeds else 0) for r in range(rows)
        ]
        ids = torch.full((rows, longest), engine.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, longest), dtype=torch.long)
        for r, seq in enumerate(chunk):
            ids[r, longest - len(seq) :] = torch.tensor(seq)
            mask[r, longest - len(seq) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        lora = engine.lora_batch([adapter] * rows)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        cache = None
        for _ in range(MAX_TOKENS):
            logits, cache = engine.forward(ids, mask, positions, cache, lora)
            step = [sample_token(logits[r], temperature, 1.0, generators[r]) for r in range(rows)]
            for r, token in enumerate(step):
                if done[r]:
                    continue
                if token == engine.eos_token_id:
                    done[r] = True
                    continue
                tokens[r].append(token)
                done[r] = _one_line(engine, tokens[r])[1]
            if all(done):
                break
            ids = torch.tensor(step).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
        answers += [_one_line(engine, t)[0] for t in tokens]
    return answers
