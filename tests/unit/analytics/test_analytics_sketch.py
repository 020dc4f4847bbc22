"""The latency sketch against numpy on the raw values, and its merge."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.analytics.sketch import ALPHA, LatencySketch, bucket_key, bucket_value

QS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def distributions():
    rng = np.random.default_rng(7)
    return {
        "lognormal": rng.lognormal(mean=-1.0, sigma=1.2, size=20_000),
        "exponential": rng.exponential(scale=0.3, size=20_000),
        "uniform": rng.uniform(0.001, 30.0, size=20_000),
        "pareto": (rng.pareto(1.5, size=20_000) + 1) * 0.05,
        "bimodal": np.concatenate(
            [rng.normal(0.08, 0.01, 15_000).clip(1e-3), rng.normal(4.0, 0.5, 5_000)]
        ),
        "constant": np.full(1_000, 0.123),
        "tiny_and_zero": np.concatenate([np.zeros(100), rng.uniform(2e-6, 1e-3, 900)]),
    }


@pytest.mark.parametrize("name", sorted(distributions()))
def test_quantiles_within_relative_accuracy_of_numpy(name):
    values = distributions()[name]
    sketch = LatencySketch.of(values.tolist())
    assert sketch.count == len(values)
    for q in QS:
        exact = float(np.quantile(values, q, method="lower"))
        estimate = sketch.quantile(q)
        if exact <= 1e-6:
            assert estimate == 0.0
        else:
            assert abs(estimate - exact) <= ALPHA * exact * (1 + 1e-9), (q, exact, estimate)


def test_bucket_estimate_is_within_alpha_of_every_value_in_the_bucket():
    for x in np.geomspace(1.1e-6, 1e4, 50_000):
        est = bucket_value(bucket_key(float(x)))
        assert abs(est - x) <= ALPHA * x * (1 + 1e-9)


def test_merge_equals_sketch_of_the_union():
    rng = np.random.default_rng(3)
    parts = [rng.lognormal(-2, 1, 3_000) for _ in range(5)]
    merged = LatencySketch()
    for part in parts:
        merged.merge(LatencySketch.of(part.tolist()))
    union = LatencySketch.of(np.concatenate(parts).tolist())
    assert merged.counts == union.counts
    everything = np.concatenate(parts)
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(everything, q, method="lower"))
        assert abs(merged.quantile(q) - exact) <= ALPHA * exact * (1 + 1e-9)


def test_merge_from_stored_counts_is_exact():
    a = LatencySketch.of([0.1, 0.2, 0.3])
    b = LatencySketch({k: str(v) for k, v in a.counts.items()})  # as read back from Redis
    assert b.counts == a.counts


def test_empty_sketch_and_bad_input():
    assert LatencySketch().quantile(0.99) == 0.0
    sketch = LatencySketch()
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            sketch.add(bad)
    with pytest.raises(ValueError):
        LatencySketch.of([1.0]).quantile(1.5)


def test_the_documented_accuracy_and_bins():
    """docs/analytics.md: every quantile within 1 % (relative) of numpy's; 1 ms..100 s in
    under 600 bins; values at or below 1 µs report 0. The numbers are the docs', not the
    module's constants."""
    values = distributions()["lognormal"]
    sketch = LatencySketch.of(values.tolist())
    for q in np.linspace(0, 1, 101):
        exact = float(np.quantile(values, q, method="lower"))
        assert abs(sketch.quantile(q) - exact) <= 0.01 * exact * (1 + 1e-9), q
    assert len({bucket_key(v) for v in np.geomspace(1e-3, 100, 100_000).tolist()}) < 600
    assert LatencySketch.of([1e-6, 5e-7, 0.0]).quantile(1.0) == 0.0
    assert LatencySketch.of([1.1e-6]).quantile(1.0) > 0.0
