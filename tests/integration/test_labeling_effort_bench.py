"""The labeling-effort benchmark end to end at its smallest size: the real demo model
answers and samples a pool, the training service's code trains real adapters on each
method's picks, and the tables, JSON and PNG come out."""

from __future__ import annotations

import json
import math

import pytest

from bench import bench_labeling_effort as bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(1800)  # 8 small training runs; minutes on a busy 2-core machine
def test_smallest_size_end_to_end(tmp_path):
    size = bench.SIZES["test"]
    result = bench.measure(size, out=tmp_path, log=lambda line: None)
    assert (tmp_path / "labeling_effort.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "labeling_effort.json").read_text())
    assert written["size"]["budgets"] == list(size.budgets)
    runs = written["runs"]
    assert len(runs) == len(size.methods) * len(size.budgets) * size.seeds
    for run in runs:
        assert len(run["picked"]) == run["budget"] == len(set(run["picked"]))
        assert math.isfinite(run["loss"]) and 0.0 <= run["f1"] <= 1.0
        # Every adapter trained: its held-out loss is not the base model's.
        assert run["loss"] != pytest.approx(run["loss_base"], abs=1e-6)
    for seed in range(size.seeds):
        small, large = (
            next(r for r in runs if (r["method"], r["seed"], r["budget"]) == ("random", seed, b))
            for b in size.budgets
        )
        assert large["picked"][: size.budgets[0]] == small["picked"]  # nested random picks
    assert set(written["reductions"]) == {"loss", "f1"}
    assert all(set(r) == set(size.methods) for r in written["reductions"].values())
    bench.report(result)  # the tables print from the same result
