"""Krippendorff's alpha: agreement among reviewers where items have several reviews.

alpha = 1 - D_o / D_e, computed through the coincidence matrix (Krippendorff 2011,
"Computing Krippendorff's Alpha-Reliability"): each item with m >= 2 values adds, for every
ordered pair of its values from different reviews, 1 / (m - 1) to o[c, k]. Then with
n_c = sum_k o[c, k] and n = sum_c n_c,

    D_o = sum_{c,k} o[c,k] delta(c,k) / n
    D_e = sum_{c,k} n_c n_k delta(c,k) / (n (n - 1))

Items with fewer than two values are not pairable and are ignored. Undefined (None) when
fewer than two pairable values exist or all values are equal (D_e = 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

LEVELS = ("nominal", "ordinal", "interval", "ratio")


def _delta(values: np.ndarray, counts: np.ndarray, level: str) -> np.ndarray:
    c = values[:, None]
    k = values[None, :]
    if level == "nominal":
        return (c != k).astype(np.float64)
    if level == "interval":
        return (c - k) ** 2
    if level == "ratio":
        total = c + k
        return np.where(total == 0, 0.0, ((c - k) / np.where(total == 0, 1, total)) ** 2)
    if level == "ordinal":
        # (sum of n_g for g between c and k, inclusive) - (n_c + n_k) / 2, squared.
        cum = np.concatenate(([0.0], np.cumsum(counts)))
        i = np.arange(len(values))
        lo, hi = np.minimum.outer(i, i), np.maximum.outer(i, i)
        between = cum[hi + 1] - cum[lo]
        return (between - (counts[lo] + counts[hi]) / 2) ** 2
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def krippendorff_alpha(items: Iterable[Sequence[float]], level: str = "interval") -> float | None:
    """alpha over items, each the values its reviewers gave (missing reviews left out)."""
    pairable = [np.asarray(v, dtype=np.float64) for v in items if len(v) >= 2]
    if not pairable:
        return None
    values = np.unique(np.concatenate(pairable))
    index = {v: i for i, v in enumerate(values.tolist())}
    o = np.zeros((len(values), len(values)))
    for unit in pairable:
        m = len(unit)
        idx = np.array([index[v] for v in unit.tolist()])
        counts = np.bincount(idx, minlength=len(values)).astype(np.float64)
        # Ordered pairs of different reviews: counts_c * counts_k, minus the m self-pairs.
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n < 2:
        return None
    delta = _delta(values, n_c, level)
    d_o = (o * delta).sum() / n
    d_e = (np.outer(n_c, n_c) * delta).sum() / (n * (n - 1))
    if d_e == 0:
        return None
    return float(1.0 - d_o / d_e)
