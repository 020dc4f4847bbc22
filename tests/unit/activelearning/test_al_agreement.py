"""Krippendorff's alpha against the textbook example and an independent pairwise computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from services.activelearning.agreement import krippendorff_alpha

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
# 12 units, values 1-5, None = missing. Published: nominal .743, ordinal .815,
# interval .849, ratio .797.
N = None
TABLE = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
]
UNITS = [[v for v in unit if v is not None] for unit in zip(*TABLE, strict=True)]


@pytest.mark.parametrize(
    ("level", "published"),
    [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)],
)
def test_textbook_example(level, published):
    assert krippendorff_alpha(UNITS, level) == pytest.approx(published, abs=5e-4)


def pairwise_alpha(units, delta) -> float:
    """alpha = 1 - D_o / D_e straight from the definition: D_o averages delta over pairs of
    values within units (each unit weighted 1/(m-1)), D_e over all pairs of pairable values."""
    units = [u for u in units if len(u) >= 2]
    values = [v for u in units for v in u]
    n = len(values)
    d_o = (
        sum(sum(delta(a, b) for a, b in itertools.permutations(u, 2)) / (len(u) - 1) for u in units)
        / n
    )
    d_e = sum(delta(a, b) for a, b in itertools.permutations(values, 2)) / (n * (n - 1))
    return 1 - d_o / d_e


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ratings_match_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    units = [list(rng.integers(1, 6, rng.integers(1, 5))) for _ in range(30)]
    assert krippendorff_alpha(units, "interval") == pytest.approx(
        pairwise_alpha(units, lambda a, b: float(a - b) ** 2)
    )
    assert krippendorff_alpha(units, "nominal") == pytest.approx(
        pairwise_alpha(units, lambda a, b: float(a != b))
    )


def test_perfect_agreement_and_undefined_cases():
    assert krippendorff_alpha([[5, 5], [1, 1, 1], [3, 3]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[4, 4], [4, 4]]) is None  # no variation: undefined
    assert krippendorff_alpha([[4], [2]]) is None  # nothing pairable
    assert krippendorff_alpha([]) is None
