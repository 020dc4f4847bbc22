"""Batch selection: top-k, k-center greedy against a naive version, hybrid, near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from services.activelearning.selection import (
    Strategy,
    check_batch_size,
    k_center_greedy,
    parse_strategy,
    select,
    text_embedding,
    top_k,
)
from services.common.errors import InvalidArgument


def test_top_k_is_the_k_largest_in_order():
    rng = np.random.default_rng(0)
    scores = rng.random(10_000)
    got = top_k(scores, 25)
    assert list(got) == list(np.argsort(-scores)[:25])


def naive_k_center(x: np.ndarray, k: int, first: int) -> list[int]:
    chosen = [first]
    while len(chosen) < k:
        d = np.min([[np.sum((p - x[c]) ** 2) for c in chosen] for p in x], axis=1)
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    return chosen


def test_k_center_greedy_matches_the_naive_definition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    assert list(k_center_greedy(x, 12, first=5)) == naive_k_center(x, 12, 5)


def test_near_copies_of_one_prompt_fill_a_top_k_batch_but_not_a_hybrid_one():
    copies = [f"Where is my order 4821? It has not arrived yet ({i})." for i in range(10)]
    others = [
        "How do I reset my PIN?",
        "My flight was delayed, what now?",
        "Can I return shoes that do not fit?",
        "Why was my card declined in Vienna?",
        "I want to change my seat to an aisle.",
    ]
    texts = copies + others
    emb = np.stack([text_embedding(t) for t in texts])
    scores = np.array([0.9 + 0.001 * i for i in range(10)] + [0.5, 0.45, 0.4, 0.35, 0.3])
    top, _ = select(scores, emb, 5, Strategy.TOP_K, duplicate_threshold=1.0)
    assert all(i < 10 for i in top)  # five near-copies
    hybrid, _ = select(scores, emb, 5, Strategy.HYBRID, duplicate_threshold=1.0)
    assert sum(i < 10 for i in hybrid) == 1
    assert hybrid[0] == 9  # seeded with the most uncertain
    deduped, skipped = select(scores, emb, 5, Strategy.TOP_K, duplicate_threshold=0.9)
    assert sum(i < 10 for i in deduped) == 1 and skipped == 9
    assert list(deduped[1:]) == [10, 11, 12, 13]


def test_text_embedding_similarity():
    a = text_embedding("Where is my order 4821?")
    assert float(a @ text_embedding("WHERE  is my order 4821?")) == pytest.approx(1.0)
    assert float(a @ text_embedding("Where is my order 4822?")) > 0.85
    assert float(a @ text_embedding("The weather in Lisbon is mild in spring.")) < 0.5


@pytest.mark.parametrize("k", [0, -3])
def test_batch_size_out_of_range(k):
    with pytest.raises(InvalidArgument) as err:
        check_batch_size(k)
    assert err.value.reason == "INVALID_BATCH_SIZE"
    with pytest.raises(InvalidArgument):
        select(np.ones(5), np.eye(5), k, Strategy.TOP_K)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_batch_larger_than_the_pool_takes_the_whole_pool(strategy):
    scores = np.array([0.2, 0.9, 0.5, 0.7, 0.1])
    picked, skipped = select(scores, np.eye(5), 50, strategy)
    assert sorted(picked.tolist()) == [0, 1, 2, 3, 4] and skipped == 0
    if strategy is Strategy.TOP_K:
        assert picked.tolist() == [1, 3, 2, 0, 4]  # ranked, most uncertain first
    empty, skipped = select(np.zeros(0), np.zeros((0, 5)), 3, strategy)
    assert empty.tolist() == [] and skipped == 0


def test_unknown_strategy():
    with pytest.raises(InvalidArgument) as err:
        parse_strategy("random-ish")
    assert err.value.reason == "UNKNOWN_STRATEGY"
