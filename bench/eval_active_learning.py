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
length is a non-uncertainty baseline. Random rows are the mean over 1,000 shuffles; AUROC
has a 95% bootstrap interval (1,000 resamples of the outputs).

The sampling-based scores (services.activelearning.dispersion) come from K more one-line
answers per prompt (the service's sample_count, 5), sampled under the same adapter at each
--temperature (default: the service's sample_temperature), seeds 1..K, many
prompts per batch (bench.al_common.sample_answers), as the service asks inference for them.

    python -m bench.eval_active_learning            # all 3 tenants, every held-out dialogue
    python -m bench.eval_active_learning --limit 50 # the first 50 dialogues per tenant
    python -m bench.eval_active_learning --temperature 1.0 --temperature 0.7
    python -m bench.eval_active_learning --offset 15 --limit 30  # dialogues 15..44

Prints a table and writes bench/results/eval_active_learning.json. CPU, deterministic.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import rankdata

from bench.al_common import (
    MODEL,
    ROOT,
    SAMPLE_COUNT,
    SAMPLE_TEMPERATURE,
    f1,
    greedy_with_stats,
    load_adapter_dir,
    sample_answers,
    turns,
)
from models.corpus import read_split
from services.activelearning.dispersion import sample_scores
from services.activelearning.scores import SAMPLING_METHODS, UncertaintyMethod, score_tokens
from services.inference.engine import Engine

ADAPTERS = ROOT / "models" / "adapters"
RESULTS = ROOT / "bench" / "results" / "eval_active_learning.json"
TENANTS = ("retailer", "bank", "airline")
WRONG_F1 = 0.5


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
    parser.add_argument("--offset", type=int, default=0, help="skip the first dialogues")
    parser.add_argument(
        "--temperature",
        type=float,
        action="append",
        help="sampling temperature of the sample_* scores (repeat for several; default: "
        "the service's sample_temperature)",
    )
    args = parser.parse_args()
    temperatures = args.temperature or [SAMPLE_TEMPERATURE]
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    started = time.perf_counter()
    engine = Engine(MODEL, device="cpu", dtype="float32")
    rows: list[dict] = []
    for tenant in TENANTS:
        weights = load_adapter_dir(engine, ADAPTERS / tenant)
        end = None if args.limit is None else args.offset + args.limit
        pairs = turns(read_split(tenant, "heldout")[args.offset : end])
        prompts = [p for p, _ in pairs]
        sampled = {
            t: sample_answers(engine, prompts, SAMPLE_COUNT, weights, temperature=t)
            for t in temperatures
        }
        with engine.adapters([weights]):
            for n, (prompt, reference) in enumerate(pairs):
                text, lp, ent, margin = greedy_with_stats(engine, prompt)
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
                for t, answers in sampled.items():
                    dispersion = sample_scores(answers[n])
                    for method in SAMPLING_METHODS:
                        rows[-1][f"{method.value} (T={t:g})"] = dispersion[method.value]
    scored = [r for r in rows if not r["empty"]]
    wrong = np.array([r["f1"] < WRONG_F1 for r in scored])
    n = len(scored)
    ks = (max(1, n // 10), max(1, n // 5))
    names = [k for k in scored[0] if k not in ("tenant", "f1", "empty")]
    table = {}
    rng = np.random.default_rng(0)
    resamples = [rng.integers(0, n, n) for _ in range(1000)]
    for name in names:
        values = np.array([r[name] for r in scored])
        boot = [auroc(values[i], wrong[i]) for i in resamples if 0 < wrong[i].sum() < n]
        table[name] = {
            "auroc": auroc(values, wrong),
            "auroc_95ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
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
        "first_dialogue": args.offset,
        "samples_per_output": SAMPLE_COUNT,
        "sample_temperatures": temperatures,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"{n} outputs ({len(rows) - n} empty left out), {int(wrong.sum())} wrong "
        f"({wrong.mean():.1%}: word F1 < {WRONG_F1} vs the held-out reply)"
    )
    header = f"{'score':<32} {'AUROC':>6} {'95% CI':>13} "
    print(header + " ".join(f"{'P@' + str(k):>7}" for k in ks))
    for name, m in table.items():
        cells = " ".join(f"{m[f'precision@{k}']:>7.3f}" for k in ks)
        ci = "{:.3f}-{:.3f}".format(*m["auroc_95ci"]) if "auroc_95ci" in m else ""
        print(f"{name:<32} {m['auroc']:>6.3f} {ci:>13} {cells}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"wrote {RESULTS.relative_to(ROOT)} in {result['seconds']} s")


if __name__ == "__main__":
    main()
