"""Sampling-based uncertainty: how much K sampled answers to one prompt disagree.

A model that knows the answer says much the same thing every time it is sampled; one that
does not says different things. From K samples s_1..s_K (K >= 2) of one prompt, with a
pairwise similarity W_ij in [0, 1] (W_ii = 1), every score is "higher = more uncertain":

    sample_jaccard          mean_{i<j} (1 - Jaccard(words_i, words_j)). Lin et al. (2023)'s
                            degree measure U_Deg = trace(K I - D) / K^2 (D: degree matrix of
                            the Jaccard graph) is this times (K - 1) / K: the same ranking.
    sample_rouge_l          mean_{i<j} (1 - ROUGE-L F1(s_i, s_j)), Google's rouge-score.
    sample_clusters         the number of distinct answers: samples are clustered greedily
                            (each joins the first cluster whose first member it matches with
                            ROUGE-L >= the threshold, as Kuhn et al. (2023) cluster with
                            entailment); 1..K.
    sample_cluster_entropy  entropy (nats) of the cluster sizes: discrete semantic entropy
                            (Farquhar et al. 2024) with lexical instead of entailment clusters.
    sample_eigv             Lin et al.'s U_EigV = sum_k max(0, 1 - lambda_k) over the
                            eigenvalues of the normalised graph Laplacian
                            I - D^-1/2 W D^-1/2 of the Jaccard graph: ~ the number of
                            semantic sets, continuous.

Words: lowercase Unicode word characters (so non-English text is compared too). Two samples
that both have no words are identical if their texts are. No entailment model: none ships
with the project and nothing is downloaded from a model hub at run time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer

_WORD = re.compile(r"\w+")


class WordTokenizer:
    """rouge-score's tokenizer interface; its default drops every non-ASCII letter."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


_TOKENIZER = WordTokenizer()
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_TOKENIZER)


def jaccard_matrix(samples: Sequence[str]) -> np.ndarray:
    sets = [set(_TOKENIZER.tokenize(s)) for s in samples]
    k = len(samples)
    w = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            union = sets[i] | sets[j]
            if union:
                w[i, j] = w[j, i] = len(sets[i] & sets[j]) / len(union)
            else:
                w[i, j] = w[j, i] = float(samples[i].strip() == samples[j].strip())
    return w


def rouge_l_matrix(samples: Sequence[str]) -> np.ndarray:
    k = len(samples)
    w = np.eye(k)
    words = [_TOKENIZER.tokenize(s) for s in samples]
    for i in range(k):
        for j in range(i + 1, k):
            if words[i] or words[j]:
                f = _ROUGE.score(samples[i], samples[j])["rougeL"].fmeasure
            else:
                f = float(samples[i].strip() == samples[j].strip())
            w[i, j] = w[j, i] = f
    return w


def mean_dissimilarity(w: np.ndarray) -> float:
    upper = np.triu_indices(len(w), k=1)
    return float(np.mean(1.0 - w[upper]))


def greedy_clusters(w: np.ndarray, threshold: float) -> list[list[int]]:
    """Sample indices grouped: each joins the first cluster whose first member it matches
    with similarity >= threshold, else starts a new one."""
    clusters: list[list[int]] = []
    for i in range(len(w)):
        for cluster in clusters:
            if w[cluster[0], i] >= threshold:
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def eigv(w: np.ndarray) -> float:
    """Lin et al.'s U_EigV of a similarity graph."""
    degree = w.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(degree)
    laplacian = np.eye(len(w)) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
    eigenvalues = np.linalg.eigvalsh(laplacian)
    return float(np.clip(1.0 - eigenvalues, 0.0, None).sum())


def sample_scores(samples: Sequence[str], cluster_similarity: float = 0.5) -> dict[str, float]:
    """Every sampling-based score (by method name) of K >= 2 samples of one prompt."""
    if len(samples) < 2:
        raise ValueError(f"dispersion needs at least 2 samples, got {len(samples)}")
    jaccard = jaccard_matrix(samples)
    rouge = rouge_l_matrix(samples)
    sizes = np.array([len(c) for c in greedy_clusters(rouge, cluster_similarity)], float)
    p = sizes / sizes.sum()
    return {
        "sample_jaccard": mean_dissimilarity(jaccard),
        "sample_rouge_l": mean_dissimilarity(rouge),
        "sample_clusters": float(len(sizes)),
        "sample_cluster_entropy": float(-(p * np.log(p)).sum()) + 0.0,
        "sample_eigv": eigv(jaccard),
    }
