"""Active-learning selection benchmark (numpy, one process, no servers).

- top-k by entropy over 1,000,000 candidates (target <= 0.3 s): the 100 most uncertain,
  (a) from each candidate's mean token entropy, (b) including the scoring itself from
  per-token entropies and log-probabilities (16 tokens per candidate on average, ragged),
  as services.activelearning.scores.ragged_scores computes all five scores.
- k-center greedy picking 100 of 50,000 x 256-d float32 embeddings (target <= 3 s).
- the service's hybrid selection (k-center greedy among the 10 x k most uncertain) and
  near-duplicate check over the same 50,000 candidates, k = 100.

Median of BENCH_REPEATS runs (default 5). Prints a table and writes
bench/results/active_learning.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from services.activelearning.scores import COLUMN, UncertaintyMethod, ragged_scores
from services.activelearning.selection import Strategy, k_center_greedy, select, top_k

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "active_learning.json"
REPEATS = int(os.environ.get("BENCH_REPEATS", 5))
N_TOPK, K, MEAN_TOKENS = 1_000_000, 100, 16
N_EMB, DIM = 50_000, 256


def timed(fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    rng = np.random.default_rng(0)
    entropy = rng.gamma(2.0, 0.5, N_TOPK)
    t_topk, picked = timed(lambda: top_k(entropy, K))
    assert np.array_equal(picked, np.argsort(-entropy, kind="stable")[:K])

    lengths = rng.integers(1, 2 * MEAN_TOKENS, N_TOPK)
    tokens = int(lengths.sum())
    tok_entropy = rng.gamma(2.0, 0.5, tokens).astype(np.float32)
    tok_logprob = -rng.exponential(0.7, tokens).astype(np.float32)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))

    def entropy_only():
        mean = np.add.reduceat(tok_entropy, starts, dtype=np.float64) / lengths
        return top_k(mean, K)

    t_entropy, _ = timed(entropy_only)
    column = COLUMN[UncertaintyMethod.ENTROPY]
    t_scored, _ = timed(
        lambda: top_k(ragged_scores(tok_logprob, tok_entropy, lengths)[:, column], K)
    )

    emb = rng.normal(size=(N_EMB, DIM)).astype(np.float32)
    t_kcenter, centers = timed(lambda: k_center_greedy(emb, K, first=0))
    assert len(set(centers.tolist())) == K
    scores = rng.gamma(2.0, 0.5, N_EMB)
    t_hybrid, _ = timed(lambda: select(scores, emb, K, Strategy.HYBRID))
    t_dedup, _ = timed(lambda: select(scores, emb, K, Strategy.TOP_K))

    result = {
        "topk_1m_from_scores_seconds": round(t_topk, 4),
        "topk_1m_with_mean_entropy_seconds": round(t_entropy, 4),
        "topk_1m_with_all_scores_seconds": round(t_scored, 4),
        "topk_1m_tokens": tokens,
        "kcenter_100_of_50k_256d_seconds": round(t_kcenter, 4),
        "hybrid_100_of_50k_seconds": round(t_hybrid, 4),
        "topk_dedup_100_of_50k_seconds": round(t_dedup, 4),
        "repeats": REPEATS,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    rows = [
        ("top-100 by entropy, 1,000,000 candidates (scores given)", t_topk, 0.3),
        (f"  ... mean entropy of {tokens:,} tokens first", t_entropy, 0.3),
        ("  ... all 5 scores of those tokens first", t_scored, None),
        ("k-center greedy, 100 of 50,000 x 256-d", t_kcenter, 3.0),
        ("hybrid (k-center among top 1,000), 100 of 50,000", t_hybrid, None),
        ("top-k + near-duplicate check, 100 of 50,000", t_dedup, None),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'median':>9}  target")
    for name, seconds, target in rows:
        verdict = "" if target is None else f"<= {target} s: {'yes' if seconds <= target else 'NO'}"
        print(f"{name:<{width}}  {seconds * 1000:7.1f}ms  {verdict}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
