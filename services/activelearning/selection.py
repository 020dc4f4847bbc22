"""Batch selection: top-k by uncertainty, k-center greedy (core-set), a hybrid of both, and
near-duplicate removal. Pure numpy; every function takes row indices into the caller's pool.

- top_k: np.argpartition (O(n)), then the k winners sorted, most uncertain first.
- k_center_greedy (Sener & Savarese, ICLR 2018): repeatedly take the point farthest from
  every point taken so far, keeping each point's distance to its nearest center (one
  matrix-vector product per pick: O(k n d)). Seeded with the most uncertain point.
- hybrid: narrow the pool to the factor * k most uncertain points, then k-center greedy
  among them, so a batch is both uncertain and not ten near-copies of one prompt.
- near-duplicates: cosine similarity of the embeddings >= threshold to an item already
  taken; such items are skipped (and counted).

The service embeds prompt + output with hashed character 3-grams (`text_embedding`)
unless a candidate brings its own embedding: the inference service has no Embed RPC yet.
"""

from __future__ import annotations

import enum
import hashlib
import re

import numpy as np

from services.activelearning.scores import parse_choice
from services.common.errors import InvalidArgument


class Strategy(enum.StrEnum):
    TOP_K = "top_k"
    DIVERSE = "diverse"
    HYBRID = "hybrid"


def parse_strategy(strategy: Strategy | str) -> Strategy:
    return parse_choice(Strategy, strategy, "selection strategy", "UNKNOWN_STRATEGY")


def check_batch_size(batch_size: int) -> None:
    """batch_size must be positive; one larger than the pool takes the whole pool, as a
    LIMIT would."""
    if batch_size <= 0:
        raise InvalidArgument(
            f"batch_size must be at least 1, got {batch_size}", reason="INVALID_BATCH_SIZE"
        )


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, largest first (ties: lower index first)."""
    n = len(scores)
    if k >= n:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def k_center_greedy(
    embeddings: np.ndarray, k: int, first: int = 0, candidates: np.ndarray | None = None
) -> np.ndarray:
    """k indices (of rows of embeddings, or of `candidates` if given) chosen by k-center
    greedy in Euclidean distance, starting from row `first` of that set."""
    x = embeddings if candidates is None else embeddings[candidates]
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = min(k, n)
    norms = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = first
    nearest = np.full(n, np.inf, dtype=np.float32)
    for i in range(1, k + 1):
        c = chosen[i - 1]
        # ||x - c||^2 = |x|^2 - 2 x.c + |c|^2; clipped: rounding can make it slightly < 0.
        d = norms - 2.0 * (x @ x[c]) + norms[c]
        np.minimum(nearest, d, out=nearest)
        nearest[c] = -1.0  # never again
        if i < k:
            chosen[i] = int(np.argmax(nearest))
    return chosen if candidates is None else candidates[chosen]


def hybrid(scores: np.ndarray, embeddings: np.ndarray, k: int, factor: int) -> np.ndarray:
    narrowed = top_k(scores, min(len(scores), max(k, k * factor)))
    return k_center_greedy(embeddings, k, first=0, candidates=narrowed)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def drop_near_duplicates(
    order: np.ndarray, unit: np.ndarray, k: int, threshold: float
) -> tuple[np.ndarray, int]:
    """The first k of `order` (indices into unit-norm rows `unit`) that are not within cosine
    `threshold` of one taken before them, and how many were skipped. threshold >= 1: off."""
    if threshold >= 1.0:
        return order[:k], 0
    taken: list[int] = []
    skipped = 0
    for i in order:
        if taken and float(np.max(unit[taken] @ unit[i])) >= threshold:
            skipped += 1
            continue
        taken.append(int(i))
        if len(taken) == k:
            break
    return np.asarray(taken, dtype=np.int64), skipped


def select(
    scores: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    strategy: Strategy,
    *,
    hybrid_factor: int = 10,
    duplicate_threshold: float = 0.9,
) -> tuple[np.ndarray, int]:
    """(indices of the batch in selection order, near-duplicates skipped). The batch has
    min(k, pool) items unless near-duplicates leave fewer distinct ones."""
    check_batch_size(k)
    n = len(scores)
    k = min(k, n)
    if k == 0:
        return np.zeros(0, dtype=np.int64), 0
    unit = normalize_rows(embeddings)
    # Orders a little longer than k leave room for skipped near-duplicates; if they still
    # leave fewer than k, the whole pool is ordered.
    for length in (min(n, 2 * k + 16), n):
        if strategy is Strategy.TOP_K:
            order = top_k(scores, length)
        elif strategy is Strategy.DIVERSE:
            order = k_center_greedy(unit, length, first=int(np.argmax(scores)))
        else:
            narrowed = top_k(scores, min(n, max(k, k * hybrid_factor)))
            order = k_center_greedy(unit, min(length, len(narrowed)), 0, narrowed)
            if length == n:  # past the narrowed pool: the rest by uncertainty
                rest = np.setdiff1d(top_k(scores, n), order, assume_unique=True)
                order = np.concatenate([order, rest[np.argsort(-scores[rest], kind="stable")]])
        taken, skipped = drop_near_duplicates(order, unit, k, duplicate_threshold)
        if len(taken) == k or length == n:
            return taken, skipped
    raise AssertionError("unreachable")


_WS = re.compile(r"\s+")


def text_embedding(text: str, dim: int = 256, n: int = 3) -> np.ndarray:
    """A unit vector of hashed character n-gram counts (feature hashing with a sign bit):
    near-identical texts get cosine close to 1, unrelated ones close to 0."""
    v = np.zeros(dim, dtype=np.float32)
    t = " " + _WS.sub(" ", text.lower()).strip() + " "
    for i in range(max(1, len(t) - n + 1)):
        h = int.from_bytes(hashlib.blake2b(t[i : i + n].encode(), digest_size=8).digest())
        v[h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v
