"""Deterministic assignment, identical to GrowthBook's SDKs for the same inputs.

The same unit id, seed, hash version, weights, coverage and namespace give the same variant
here as in GrowthBook's JS/Python SDKs (same FNV-1a-32 hash, same floating-point bucket
ranges), so experiments can be moved between the two without re-randomising anyone.

- hash v1: fnv1a32(value + seed) % 1000 / 1000
- hash v2: fnv1a32(str(fnv1a32(seed + value))) % 10000 / 10000 (better-mixed, default)
- bucket ranges: variant i gets [c_i, c_i + coverage * w_i) where c_i = w_0 + ... + w_{i-1},
  so raising coverage only widens ranges and never moves an assigned unit.
- namespaces: the unit is in the namespace when hash v1 of ("__" + name) is in
  [start, end); units outside it are "not in experiment".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
NOT_IN_EXPERIMENT = -1


def fnv1a32(text: str) -> int:
    """FNV-1a 32 over UTF-16 code units (what the JS SDK's charCodeAt loop hashes)."""
    hval = _FNV_OFFSET
    if text.isascii():
        for byte in text.encode():
            hval = ((hval ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    else:
        data = text.encode("utf-16-le", "surrogatepass")
        for i in range(0, len(data), 2):
            hval = ((hval ^ (data[i] | (data[i + 1] << 8))) * _FNV_PRIME) & 0xFFFFFFFF
    return hval


def gb_hash(seed: str, value: str, version: int) -> float:
    """The unit's position in [0, 1). Raises ValueError for versions other than 1 and 2."""
    if version == 2:
        return (fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000
    if version == 1:
        return (fnv1a32(value + seed) % 1000) / 1000
    raise ValueError(f"hash version must be 1 or 2, got {version}")


def bucket_ranges(weights: Sequence[float], coverage: float = 1.0) -> list[tuple[float, float]]:
    coverage = min(max(coverage, 0.0), 1.0)
    ranges = []
    cumulative = 0.0
    for w in weights:
        start = cumulative
        cumulative += w
        ranges.append((start, start + coverage * w))
    return ranges


def choose_variation(n: float, ranges: Sequence[tuple[float, float]]) -> int:
    for i, (start, end) in enumerate(ranges):
        if start <= n < end:
            return i
    return NOT_IN_EXPERIMENT


def in_namespace(unit_id: str, name: str, start: float, end: float) -> bool:
    return start <= gb_hash("__" + name, unit_id, 1) < end


@dataclass(frozen=True)
class Bucketing:
    variant_index: int  # NOT_IN_EXPERIMENT (-1) when excluded
    bucket: float  # the unit's hash n in [0, 1)

    @property
    def in_experiment(self) -> bool:
        return self.variant_index >= 0


def assign(
    unit_id: str,
    seed: str,
    hash_version: int,
    weights: Sequence[float],
    coverage: float = 1.0,
    namespace: tuple[str, float, float] | None = None,
) -> Bucketing:
    """GrowthBook's steps 7 (namespace) and 9-10 (hash, ranges, choose) of runExperiment."""
    n = gb_hash(seed, unit_id, hash_version)
    if namespace is not None and not in_namespace(unit_id, *namespace):
        return Bucketing(NOT_IN_EXPERIMENT, n)
    return Bucketing(choose_variation(n, bucket_ranges(weights, coverage)), n)
