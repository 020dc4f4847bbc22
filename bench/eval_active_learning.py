"""How well does each uncertainty score find the model's wrong or low-quality outputs?

A task with known answers: the demo tenants' held-out dialogues (models/data/<tenant>/
heldout.txt, 200 per tenant, another seed than training). For every agent turn, the
conversation up to it is the prompt and the held-out agent line the reference; the demo
model with the tenant's adapter (models/adapters/<tenant>, the adapters whose held-out loss
models/adapters/eval.json reports) answers greedily, one line. An output is "wrong" when its
word-level F1 against the reference is below 0.5 (SQuAD-style token F1 on lowercased words).

Every score ranks the outputs, most uncertain first; reported per score: AUROC for telling
wrong from right outputs (0.5 = random), and precision@k, the share of wrong outputs among
the k ranked first, for k = 10% and 20% of the outputs (random selection: the base rate).
The scores are the service's (services.activelearning.scores), margin both exact (from the
logits) and as the service approximates it from the chosen token's probability; output
length is a non-uncertainty baseline. Random rows are the mean over 1,000 shuffles.

    python -m bench.eval_active_learning            # all 3 tenants, every held-out dialogue
    python -m bench.eval_active_learning --limit 50 # the first 50 dialogues per tenant

Prints a table and writes bench/results/eval_active_learning.json. CPU, deterministic.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from services.activelearning.scores import UncertaintyMethod, score_tokens
from services.inference.engine import Engine
from services.inference.lora import parse_adapter

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "loraplex-tiny"
DATA = ROOT / "models" / "data"
ADAPTERS = ROOT / "models" / "adapters"
RESULTS = ROOT / "bench" / "results" / "eval_active_learning.json"
TENANTS = ("retailer", "bank", "airline")
WRONG_F1 = 0.5
MAX_TOKENS = 48
_WORD = re.compile(r"[a-z0-9$%.]+")


def words(text: str) -> list[str]:
    return [w.strip(".") for w in _WORD.findall(text.lower()) if w.strip(".")]


def f1(output: str, reference: str) -> float:
    out, ref = words(output), words(reference)
    common = sum((Counter(out) & Counter(ref)).values())
    if not out or not ref or not common:
        return 0.0
    precision, recall = common / len(out), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def turns(path: Path, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, reference) for every agent line of the first `limit` dialogues."""
    dialogues = [d for d in path.read_text().split("\n\n") if d.strip()][:limit]
    out = []
    for dialogue in dialogues:
        lines = dialogue.strip().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Agent:"):
                prompt = "\n".join(lines[:i]) + "\nAgent:"
                out.append((prompt, line.removeprefix("Agent:").strip()))
    return out


@torch.inference_mode()
def generate(engine: Engine, prompt: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
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
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        if "\n" in text:
            text = text[: text.index("\n")]
            break
        ids = torch.tensor([[token]])
    return text.strip(), np.array(lps), np.array(ents), np.array(margins)


def auroc(scores: np.ndarray, wrong: np.ndarray) -> float:
    """P(a wrong output scores higher than a right one), ties counting half."""
    ranks = rankdata(scores)
    n_pos, n_neg = wrong.sum(), (~wrong).sum()
    return float((ranks[wrong].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at(scores: np.ndarray, wrong: np.ndarray, k: int) -> float:
    order = np.lexsort((np.arange(len(scores)), -scores))  # stable, highest first
    return float(wrong[order[:k]].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="dialogues per tenant")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    started = time.perf_counter()
    engine = Engine(MODEL, device="cpu", dtype="float32")
    rows: list[dict] = []
    for tenant in TENANTS:
        directory = ADAPTERS / tenant
        weights = parse_adapter(
            (directory / "adapter_config.json").read_bytes(),
            (directory / "adapter_model.safetensors").read_bytes(),
            engine.linear_shapes,
            dtype=engine.dtype,
            device=engine.device,
        )
        with engine.adapters([weights]):
            for prompt, reference in turns(DATA / tenant / "heldout.txt", args.limit):
                text, lp, ent, margin = generate(engine, prompt)
                if not len(lp):
                    rows.append({"tenant": tenant, "f1": 0.0, "empty": True})
                    continue
                exact = score_tokens(lp, ent, margin)
                approx = score_tokens(lp, ent)
                rows.append(
                    {
                        "tenant": tenant,
                        "f1": f1(text, reference),
                        "empty": False,
                        "entropy": exact.entropy,
                        "max_entropy": exact.max_entropy,
                        "least_confidence": exact.rank_value(UncertaintyMethod.LEAST_CONFIDENCE),
                        "margin (exact)": exact.margin,
                        "margin (service approx.)": approx.margin,
                        "nll": exact.nll,
                        "length (tokens)": float(len(lp)),
                    }
                )
    scored = [r for r in rows if not r["empty"]]
    wrong = np.array([r["f1"] < WRONG_F1 for r in scored])
    n = len(scored)
    ks = (max(1, n // 10), max(1, n // 5))
    names = [k for k in scored[0] if k not in ("tenant", "f1", "empty")]
    table = {}
    for name in names:
        values = np.array([r[name] for r in scored])
        table[name] = {
            "auroc": auroc(values, wrong),
            **{f"precision@{k}": precision_at(values, wrong, k) for k in ks},
        }
    rng = np.random.default_rng(0)
    shuffles = [rng.random(n) for _ in range(1000)]
    table["random"] = {
        "auroc": float(np.mean([auroc(s, wrong) for s in shuffles])),
        **{
            f"precision@{k}": float(np.mean([precision_at(s, wrong, k) for s in shuffles]))
            for k in ks
        },
    }
    result = {
        "outputs": n,
        "empty_outputs": len(rows) - n,
        "wrong": int(wrong.sum()),
        "wrong_rate": float(wrong.mean()),
        "wrong_definition": f"word F1 vs the held-out reply < {WRONG_F1}",
        "mean_f1": float(np.mean([r["f1"] for r in scored])),
        "per_tenant": {
            t: {
                "outputs": sum(r["tenant"] == t for r in scored),
                "wrong_rate": float(
                    np.mean([r["f1"] < WRONG_F1 for r in scored if r["tenant"] == t])
                ),
            }
            for t in TENANTS
        },
        "scores": table,
        "dialogues_per_tenant": args.limit or "all",
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"{n} outputs ({len(rows) - n} empty left out), {int(wrong.sum())} wrong "
        f"({wrong.mean():.1%}: word F1 < {WRONG_F1} vs the held-out reply)"
    )
    header = f"{'score':<26} {'AUROC':>6} " + " ".join(f"{'P@' + str(k):>7}" for k in ks)
    print(header)
    for name, m in table.items():
        cells = " ".join(f"{m[f'precision@{k}']:>7.3f}" for k in ks)
        print(f"{name:<26} {m['auroc']:>6.3f} {cells}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"wrote {RESULTS.relative_to(ROOT)} in {result['seconds']} s")


if __name__ == "__main__":
    main()
