"""A mergeable latency sketch with log-spaced buckets (DDSketch, Masson et al., VLDB 2019).

Relative accuracy ALPHA = 1%: every quantile it reports is within 1% (relative) of the
exact quantile of the values it was fed (the order statistic of rank floor(q * (n - 1)),
numpy's method="lower").

A positive value x falls into bucket i = ceil(log_gamma(x)) with gamma = (1 + a) / (1 - a),
so bucket i covers (gamma**(i-1), gamma**i]; the bucket's estimate 2 * gamma**i / (gamma + 1)
is within a of every value in it. Values at or below MIN_VALUE (1 µs) count in a zero bucket
reported as 0. A sketch is just {bucket index: count}, so merging sketches, of replicas or
of time buckets, is adding counts: the merge is exactly the sketch of the union, and the
bound holds for any merge. In Redis the counts live in hash fields (HINCRBY), one per
non-empty bucket; a latency range of 1 ms to 100 s spans under 600 buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

ALPHA = 0.01
GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
MIN_VALUE = 1e-6
ZERO = "z"  # the zero bucket's key
ZERO_INDEX = -(2**62)  # ... and its index


def bucket_index(value: float) -> int:
    """The bucket a non-negative finite value counts in (ZERO_INDEX: the zero bucket)."""
    if value <= MIN_VALUE:
        return ZERO_INDEX
    return math.ceil(math.log(value) / _LOG_GAMMA)


def bucket_key(value: float) -> str:
    """bucket_index as stored: a hash-field suffix in Redis, a key of LatencySketch.counts."""
    index = bucket_index(value)
    return ZERO if index == ZERO_INDEX else str(index)


def bucket_value(key: str) -> float:
    if key == ZERO:
        return 0.0
    return 2 * GAMMA ** int(key) / (GAMMA + 1)


class LatencySketch:
    """Counts per bucket; add(), merge() and quantile() are all it needs."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter()
        if counts:
            self.merge_counts(counts)

    @classmethod
    def of(cls, values: Iterable[float]) -> LatencySketch:
        sketch = cls()
        for v in values:
            sketch.add(v)
        return sketch

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def add(self, value: float, count: int = 1) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"latency must be finite and >= 0, got {value!r}")
        self.counts[bucket_key(value)] += count

    def merge(self, other: LatencySketch) -> LatencySketch:
        self.counts.update(other.counts)
        return self

    def merge_counts(self, counts: Mapping[str, int]) -> None:
        for key, n in counts.items():
            if n:
                self.counts[key] += int(n)

    def quantile(self, q: float) -> float:
        """The estimate of the value of rank floor(q * (n - 1)); 0.0 for an empty sketch."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        n = self.count
        if n == 0:
            return 0.0
        rank = math.floor(q * (n - 1))
        seen = 0
        for key in sorted(self.counts, key=_order):
            seen += self.counts[key]
            if seen > rank:
                return bucket_value(key)
        raise AssertionError("unreachable")

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        return [self.quantile(q) for q in qs]


def _order(key: str) -> float:
    return -math.inf if key == ZERO else int(key)
