"""Sampling-based scores against hand computations and networkx's normalised Laplacian."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from services.activelearning.dispersion import jaccard_matrix, sample_scores
from services.activelearning.sampler import chat_messages

SAMPLES = ["The cat sat.", "the cat ran", "A dog!"]


def test_scores_by_hand():
    got = sample_scores(SAMPLES, cluster_similarity=0.5)
    # Word sets {the, cat, sat}, {the, cat, ran}, {a, dog}: Jaccard 2/4, 0, 0.
    assert got["sample_jaccard"] == pytest.approx((0.5 + 1 + 1) / 3)
    # LCS("the cat sat", "the cat ran") = 2 words: precision = recall = F1 = 2/3.
    assert got["sample_rouge_l"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    # The first two are one answer (F1 2/3 >= 0.5), the dog another.
    assert got["sample_clusters"] == 2
    assert got["sample_cluster_entropy"] == pytest.approx(
        -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    )
    strict = sample_scores(SAMPLES, cluster_similarity=0.9)
    assert strict["sample_clusters"] == 3
    assert strict["sample_cluster_entropy"] == pytest.approx(math.log(3))


def test_eigv_is_lin_et_al_from_networkx():
    w = jaccard_matrix(SAMPLES)
    laplacian = nx.normalized_laplacian_matrix(nx.from_numpy_array(w)).toarray()
    expected = sum(max(0.0, 1.0 - lam) for lam in np.linalg.eigvals(laplacian).real)
    assert sample_scores(SAMPLES)["sample_eigv"] == pytest.approx(expected)


def test_jaccard_dispersion_orders_as_lin_et_al_degree():
    samples = ["a b c", "a b d", "x y", "a b c", "q"]
    w = jaccard_matrix(samples)
    k = len(samples)
    u_deg = np.trace(k * np.eye(k) - np.diag(w.sum(axis=1))) / k**2
    assert sample_scores(samples)["sample_jaccard"] * (k - 1) / k == pytest.approx(u_deg)


def test_agreeing_and_disagreeing_extremes():
    same = sample_scores(["Your order ships Monday."] * 4)
    assert (same["sample_jaccard"], same["sample_rouge_l"], same["sample_clusters"]) == (0, 0, 1)
    assert same["sample_cluster_entropy"] == 0
    assert same["sample_eigv"] == pytest.approx(1.0)  # one set of meanings
    apart = sample_scores(["red", "green", "blue", "gold"])
    assert (apart["sample_jaccard"], apart["sample_rouge_l"], apart["sample_clusters"]) == (1, 1, 4)
    assert apart["sample_eigv"] == pytest.approx(4.0)


def test_non_english_words_count_and_empty_samples_compare_by_text():
    assert sample_scores(["Добрый день", "добрый день!"])["sample_rouge_l"] == 0
    assert sample_scores(["", " "])["sample_jaccard"] == 0
    assert sample_scores(["...", "!!!"])["sample_jaccard"] == 1


def test_needs_two_samples():
    with pytest.raises(ValueError):
        sample_scores(["only one"])


def test_chat_prompts_become_messages_again():
    flat = (
        "system: Be brief.\nuser: Where is my order?\nIt is 4821.\nassistant: Checking.\nuser: ok"
    )
    messages = [(m.role, m.content) for m in chat_messages(flat)]
    assert messages == [
        ("system", "Be brief."),
        ("user", "Where is my order?\nIt is 4821."),
        ("assistant", "Checking."),
        ("user", "ok"),
    ]
    assert chat_messages("Customer: Where is my order?\nAgent:") is None
