"""Labeling effort: how many reviewed examples does a tenant need to reach an adapter quality,
choosing them with active learning versus at random?

A tenant ("retailer" of the demo) serves the base model loraplex-tiny and wants an adapter.
Its pool: every agent turn of `pool_dialogues` new support dialogues from the project's corpus
generator (models/corpus.py) with seed 4 (the demo adapters trained on seed 1, the held-out
files are seed 2, the base model's tenant data seed 3), the conversation so far as the prompt
and the generated agent line as the reference answer. The base model answers every prompt
(greedy, one line; token statistics for the token scores) and samples `samples` more answers
(seeds 1..K, the service's sample_temperature, for the sample_* scores), once.

For every seed (a random `POOL_FRACTION` of the pool, the random order and the training seed)
and budget b, each method picks b prompts:

- random: the first b of a seeded shuffle;
- each token score (entropy, max_entropy, least_confidence, margin, nll): top-b, as the
  service selects (near-duplicates skipped, n-gram embeddings);
- each sampling score: top-b among the `SHORTLIST_FACTOR` x b ranked first by margin (the
  service's shortlist);
- diverse: k-center greedy on the embeddings (seeded with the top margin), pure diversity;
- hybrid: k-center greedy among the 10 x b most uncertain by margin (the service's hybrid).

A simulated reviewer "labels" each pick with its reference answer (a corrected text, as SFT
rows {"prompt", "completion"}), and the training service's own code (services.training.
trainer.run: TRL's SFTTrainer on a fresh PEFT LoRA, r 8 on q/v) trains an adapter on them.
Quality: the adapter's loss on the reference answers of the first `test_dialogues` held-out
dialogues (models/data/retailer/heldout.txt), and the word F1 of its greedy answers there.

Labeling-effort reduction of a method: 1 - b*/B, where B is the largest budget and b* the
budget at which the method's mean held-out loss (and, separately, word F1) reaches
random's mean at B (linear
interpolation in log budget between measured budgets; never reached: reported as "> B", a
reduction below 0). The 95% interval is a bootstrap over seeds (resampling seeds with
replacement, paired: the same seeds for random and the method).

    python -m bench bench_labeling_effort                  # the default size
    python -m bench.bench_labeling_effort --size small     # a quick look
    python -m bench.bench_labeling_effort --methods random,margin,sample_rouge_l

Prints the tables, writes bench/results/labeling_effort.json and labeling_effort.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.al_common import (
    MODEL,
    f1,
    greedy_answers,
    greedy_with_stats,
    load_adapter,
    sample_answers,
    turns,
)
from models.corpus import read_split, tenant_dialogue
from services.activelearning.dispersion import sample_scores
from services.activelearning.scores import (
    SAMPLING_METHODS,
    TOKEN_METHODS,
    UncertaintyMethod,
    score_tokens,
)
from services.activelearning.selection import Strategy, select, text_embedding
from services.inference.engine import Engine
from services.training.data import Splits
from services.training.params import Method, resolve_params
from services.training.settings import TrainingSettings
from services.training.trainer import CONFIG_FILE, WEIGHTS_FILE, Hooks, RunSpec, run

RESULTS = Path(__file__).parent / "results"
TENANT = "retailer"
POOL_SEED = 4  # models/corpus.py SPLIT_SEEDS: train 1, heldout 2, base 3
POOL_FRACTION = 0.8
SHORTLIST_FACTOR = 3  # ActiveLearningSettings.shortlist_factor
HYBRID_FACTOR = 10  # ActiveLearningSettings.hybrid_pool_factor
SHORTLIST = UncertaintyMethod.MARGIN  # ActiveLearningSettings.shortlist_method
TRAINING = {"learning_rate": 3e-3, "epochs": 3, "batch_size": 8, "max_length": 256}
METHODS = (
    "random",
    *(m.value for m in TOKEN_METHODS),
    *(m.value for m in SAMPLING_METHODS),
    "diverse",
    "hybrid",
)


@dataclass(frozen=True)
class Size:
    pool_dialogues: int
    test_dialogues: int
    budgets: tuple[int, ...]
    seeds: int
    samples: int
    methods: tuple[str, ...] = METHODS


# The default size runs one score of each kind that the error-detection evaluation tells
# apart (entropy, margin, one sampling score; the other sampling scores rank within noise of
# sample_rouge_l there), to fit 30 minutes on 2 idle cores; `--methods all` runs all 13.
DEFAULT_METHODS = ("random", "entropy", "margin", "sample_rouge_l", "diverse", "hybrid")
SIZES = {
    # ~430 pool turns, ~65 test turns, 6 methods x 4 budgets x 3 seeds = 72 adapters.
    "default": Size(200, 30, (25, 50, 100, 200), 3, 5, DEFAULT_METHODS),
    "small": Size(60, 15, (10, 20, 40), 2, 5, ("random", "margin", "sample_rouge_l")),
    # the end-to-end test
    "test": Size(8, 3, (4, 8), 2, 2, ("random", "sample_jaccard")),
}


@dataclass
class Candidate:
    prompt: str
    reference: str
    output: str
    scores: dict[str, float]
    embedding: np.ndarray


def pool_turns(count: int) -> list[tuple[str, str]]:
    rng = random.Random(POOL_SEED * 1000 + 0)  # the retailer's stream (index 0)
    return turns([tenant_dialogue(TENANT, rng) for _ in range(count)])


def score_pool(engine: Engine, pairs: list[tuple[str, str]], samples: int) -> list[Candidate]:
    """The base model's answer to every pool prompt with every method's score."""
    sampled = sample_answers(engine, [p for p, _ in pairs], samples)
    pool = []
    for (prompt, reference), answers in zip(pairs, sampled, strict=True):
        text, lp, ent, _ = greedy_with_stats(engine, prompt)
        if not len(lp):  # no tokens to score: the service would reject it too
            continue
        token = score_tokens(lp, ent)  # the service's margin approximation
        scores = {m.value: token.rank_value(m) for m in TOKEN_METHODS}
        scores |= sample_scores(answers)
        embedding = text_embedding(prompt + "\n" + text)
        pool.append(Candidate(prompt, reference, text, scores, embedding))
    return pool


def choose(method: str, pool: list[Candidate], budget: int, rng: np.random.Generator) -> list[int]:
    """Indices into pool of the `budget` picks of `method`."""
    n = len(pool)
    if method == "random":
        return rng.permutation(n)[:budget].tolist()
    embeddings = np.stack([c.embedding for c in pool])
    margin = np.array([c.scores[SHORTLIST.value] for c in pool])
    if method == "diverse":
        picked, _ = select(margin, embeddings, budget, Strategy.DIVERSE)
    elif method == "hybrid":
        picked, _ = select(margin, embeddings, budget, Strategy.HYBRID, hybrid_factor=HYBRID_FACTOR)
    elif UncertaintyMethod(method).sampled:
        short, _ = select(margin, embeddings, min(n, SHORTLIST_FACTOR * budget), Strategy.TOP_K)
        values = np.array([pool[i].scores[method] for i in short])
        picked, _ = select(values, embeddings[short], budget, Strategy.TOP_K)
        picked = short[picked]
    else:
        values = np.array([c.scores[method] for c in pool])
        picked, _ = select(values, embeddings, budget, Strategy.TOP_K)
    return [int(i) for i in picked]


def sft_rows(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """What a reviewer's corrected texts export as (TRL prompt-completion)."""
    return [{"prompt": p, "completion": " " + r} for p, r in pairs]


def train_and_measure(
    engine: Engine, train: list[dict[str, str]], test: list[tuple[str, str]], seed: int
) -> dict[str, float]:
    """Train an adapter with the training service's code; its held-out loss and word F1."""
    params = resolve_params({**TRAINING, "seed": seed}, TrainingSettings())
    with tempfile.TemporaryDirectory() as job_dir:
        spec = RunSpec(
            model_dir=MODEL,
            job_dir=Path(job_dir),
            method=Method.SFT,
            params=params,
            splits=Splits(train=train, heldout=sft_rows(test)),
            checkpoint_steps=1_000_000,  # no checkpoints: nothing resumes a benchmark run
        )
        result = run(spec, Hooks())
    weights = load_adapter(engine, result.files[CONFIG_FILE], result.files[WEIGHTS_FILE])
    answers = greedy_answers(engine, [p for p, _ in test], weights)
    return {
        "loss": result.record["eval_loss"],
        "loss_base": result.record["eval_loss_before"],
        "f1": float(np.mean([f1(a, r) for a, (_, r) in zip(answers, test, strict=True)])),
    }


def budget_to_reach(budgets: Sequence[int], losses: Sequence[float], target: float) -> float:
    """The smallest budget at which a loss curve reaches `target` (linear in log budget
    between measured points); inf when it never does."""
    if losses[0] <= target:
        return float(budgets[0])
    for i in range(1, len(budgets)):
        (b0, l0), (b1, l1) = (budgets[i - 1], losses[i - 1]), (budgets[i], losses[i])
        if l1 <= target:
            t = (l0 - target) / (l0 - l1)
            return float(math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))))
    return math.inf


def reduction(
    budgets: Sequence[int],
    random_losses: np.ndarray,
    method_losses: np.ndarray,
    resamples: int = 2000,
    rng_seed: int = 0,
) -> dict[str, float]:
    """Labeling-effort reduction (1 - b*/B) from [seeds, budgets] loss arrays, with a 95%
    bootstrap interval over seeds (paired)."""

    def one(rows: np.ndarray) -> float:
        target = random_losses[rows, -1].mean()
        needed = budget_to_reach(budgets, method_losses[rows].mean(axis=0).tolist(), target)
        return 1.0 - needed / budgets[-1]

    seeds = len(random_losses)
    rng = np.random.default_rng(rng_seed)
    boot = [one(rng.integers(0, seeds, seeds)) for _ in range(resamples)]
    point = one(np.arange(seeds))
    return {
        "reduction": point,
        # Percentiles that are resampled values (never reached: -inf, no interpolation).
        "ci_low": float(np.percentile(boot, 2.5, method="inverted_cdf")),
        "ci_high": float(np.percentile(boot, 97.5, method="inverted_cdf")),
        "budget_needed": budgets[-1] * (1.0 - point),
    }


def reductions_by_metric(
    budgets: Sequence[int], curves: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Every method's reduction by held-out loss, and by word F1 (higher is better: its
    negative is the curve that must come down to random's)."""
    sign = {"loss": 1.0, "f1": -1.0}
    return {
        metric: {
            method: reduction(
                budgets, sign[metric] * curves["random"][metric], sign[metric] * c[metric]
            )
            for method, c in curves.items()
        }
        for metric in ("loss", "f1")
    }


def finite(value):
    """JSON has no infinity: a budget never reached (and its reduction) becomes null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def plot(path: Path, size: Size, curves: dict[str, dict[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, label in (
        (axes[0], "loss", "held-out loss (nats/token)"),
        (axes[1], "f1", "word F1"),
    ):
        for method, values in curves.items():
            m = values[metric]
            style = {"color": "black", "linewidth": 2.5} if method == "random" else {}
            ax.errorbar(
                size.budgets, m.mean(axis=0), yerr=m.std(axis=0), label=method, capsize=2, **style
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(size.budgets, [str(b) for b in size.budgets])
        ax.set_xlabel("labeled examples (budget)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Learning curves, {size.seeds} seeds (mean ± sd), pool of {TENANT} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(size: Size, out: Path = RESULTS, log: Callable[[str], None] = print) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    started = time.perf_counter()
    engine = Engine(MODEL, device="cpu", dtype="float32")
    full_pool = score_pool(engine, pool_turns(size.pool_dialogues), size.samples)
    test = turns(read_split(TENANT, "heldout")[: size.test_dialogues])
    scored = time.perf_counter() - started
    log(f"pool: {len(full_pool)} turns scored in {scored:.0f} s; test: {len(test)} turns")
    keep = int(len(full_pool) * POOL_FRACTION)
    if keep < max(size.budgets):
        raise SystemExit(f"the pool ({keep} per seed) is smaller than the largest budget")
    runs = []
    for seed in range(size.seeds):
        rng = np.random.default_rng(seed)
        pool = [full_pool[i] for i in sorted(rng.permutation(len(full_pool))[:keep])]
        for method in size.methods:
            order_rng = np.random.default_rng(1000 + seed)
            # Random picks are nested: budget b takes the first b of one shuffle.
            order = (
                choose(method, pool, max(size.budgets), order_rng) if method == "random" else None
            )
            for budget in size.budgets:
                picked = (
                    order[:budget] if order is not None else choose(method, pool, budget, order_rng)
                )
                labels = sft_rows([(pool[i].prompt, pool[i].reference) for i in picked])
                result = train_and_measure(engine, labels, test, seed)
                runs.append(
                    {"method": method, "budget": budget, "seed": seed, "picked": picked, **result}
                )
                log(f"seed {seed} {method} {budget}: {result}")
    # curves[method][metric]: [seeds, budgets]
    by_key = {(r["method"], r["seed"], r["budget"]): r for r in runs}
    curves = {
        method: {
            metric: np.array(
                [[by_key[method, s, b][metric] for b in size.budgets] for s in range(size.seeds)]
            )
            for metric in ("loss", "f1")
        }
        for method in size.methods
    }
    reductions = reductions_by_metric(size.budgets, curves) if "random" in curves else {}
    result = {
        "size": asdict(size),
        "tenant": TENANT,
        "pool_turns": len(full_pool),
        "pool_turns_per_seed": keep,
        "test_turns": len(test),
        "base_model": {"loss": runs[0]["loss_base"]},
        "training": TRAINING,
        "runs": runs,
        "curves": {m: {k: v.tolist() for k, v in c.items()} for m, c in curves.items()},
        "reductions": reductions,
        "pool_scoring_seconds": round(scored, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "labeling_effort.json").write_text(json.dumps(finite(result), indent=2) + "\n")
    plot(out / "labeling_effort.png", size, curves)
    return result


def percent(reduction: float) -> str:
    return f"{reduction:+.0%}" if math.isfinite(reduction) else "not reached"


def report(result: dict) -> None:
    size = result["size"]
    budgets = size["budgets"]
    base = result["base_model"]["loss"]
    print(f"\nmean ± sd over {size['seeds']} seeds (base model without adapter: loss {base:.4f})")
    for metric in ("loss", "f1"):
        print(f"\n{metric:<24}" + "".join(f"{b:>16}" for b in budgets))
        for method, c in result["curves"].items():
            m = np.array(c[metric])
            cells = "".join(
                f"{mu:>9.4f} ± {sd:.3f}" for mu, sd in zip(m.mean(0), m.std(0), strict=True)
            )
            print(f"{method:<24}{cells}")
    for metric, by_method in result["reductions"].items():
        what = "held-out loss" if metric == "loss" else "word F1"
        print(f"\nlabels to reach random's {what} at {budgets[-1]} (reduction, 95% CI over seeds)")
        for method, r in by_method.items():
            needed = r["budget_needed"]
            needed = f"{needed:.0f}" if math.isfinite(needed) else f"> {budgets[-1]}"
            interval = f"[{percent(r['ci_low'])}, {percent(r['ci_high'])}]"
            print(f"{method:<24}{needed:>8}   {percent(r['reduction']):>11}  {interval}")
    scoring = result["pool_scoring_seconds"]
    print(f"\n{result['seconds']:.0f} s in all ({scoring:.0f} s scoring the pool)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument(
        "--methods", help="comma-separated, 'all' or a subset of: " + ", ".join(METHODS)
    )
    parser.add_argument("--seeds", type=int, help="override the size's number of seeds")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    if args.methods == "all":
        size = replace(size, methods=METHODS)
    elif args.methods:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
        size = replace(size, methods=tuple(args.methods.split(",")))
    if args.seeds:
        size = replace(size, seeds=args.seeds)
    result = measure(size)
    report(result)
    print(f"wrote {RESULTS / 'labeling_effort.json'} and {RESULTS / 'labeling_effort.png'}")


if __name__ == "__main__":
    main()
