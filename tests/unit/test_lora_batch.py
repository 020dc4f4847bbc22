"""LoraBatch.select and .concat (rows leaving and joining a running batch) give the same
per-row LoRA as gathering the new rows from scratch."""

from __future__ import annotations

import json

import pytest
import torch

from services.inference.engine import Engine
from services.inference.lora_batch import LoraBatch
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS, DEMO_TENANTS, load_lora_weights


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(InferenceSettings().model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def demo(engine):
    return {t: load_lora_weights(DEMO_ADAPTERS / t, engine.linear_shapes) for t in DEMO_TENANTS}


def same_deltas(engine: Engine, got: LoraBatch, expected: LoraBatch) -> None:
    assert got.rows == expected.rows
    generator = torch.Generator().manual_seed(0)
    for name, shape in engine.linear_shapes.items():
        x = torch.randn(got.rows, 3, shape.in_features, generator=generator)
        ours, theirs = got.delta(name, x), expected.delta(name, x)
        if theirs is None:
            assert ours is None or not ours.abs().any(), name
        else:
            assert ours is not None, name
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("rows", "keep"),
    [
        (["retailer", None, "bank", "airline", "retailer"], [4, 2, 1]),
        (["bank", "bank", "bank"], [2, 0]),  # one adapter everywhere
        (["airline", None], [1]),  # only a row without adapter is left
    ],
)
def test_select_equals_building_the_kept_rows(engine, demo, rows, keep):
    adapters = [demo.get(r) for r in rows]
    built = engine.lora_batch(adapters)
    kept = built.select(torch.tensor(keep))
    same_deltas(engine, kept, engine.lora_batch([adapters[i] for i in keep]))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["retailer", None], ["bank", "airline"]),  # ranks 8 and 16, different modules
        (["bank"], ["bank", "bank"]),  # the same single adapter on both sides
        (["bank"], ["airline"]),  # two different single adapters
        ([None, None], ["retailer"]),  # rows without adapters, then one
        (["airline", "retailer"], [None]),
    ],
)
def test_concat_equals_building_all_rows(engine, demo, first, second):
    one = engine.lora_batch([demo.get(r) for r in first])
    two = engine.lora_batch([demo.get(r) for r in second])
    joined = one.concat(two)
    same_deltas(engine, joined, engine.lora_batch([demo.get(r) for r in first + second]))


def test_siblings_share_one_product_of_the_same_input_and_only_of_it(engine, demo):
    batch = engine.lora_batch([demo["bank"], demo["airline"], None, demo["retailer"]])
    layer = "model.layers.1"
    generator = torch.Generator().manual_seed(1)

    def check(name: str, x: torch.Tensor) -> None:
        out = torch.randn(batch.rows, 3, engine.linear_shapes[name].out_features)
        expected = out + batch.delta(name, x)
        batch.add_to(name, x, out)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    hidden = torch.randn(batch.rows, 3, 256, generator=generator)
    for leaf in ("q_proj", "k_proj", "v_proj"):  # one input, as in attention
        check(f"{layer}.self_attn.{leaf}", hidden)
    other = torch.randn(batch.rows, 3, 256, generator=generator)
    check(f"{layer}.self_attn.q_proj", hidden)  # a new round with the same input...
    check(f"{layer}.self_attn.k_proj", other)  # ...and a sibling given another input
    for leaf in ("gate_proj", "up_proj"):
        check(f"{layer}.mlp.{leaf}", hidden)


def test_stacks_hold_each_distinct_adapter_once_however_many_rows_use_it(engine, demo):
    """Rows are grouped by adapter: the stacks hold, per module, the adapters that target
    it, padded to their largest rank, and no more when more rows share them."""
    configs = {
        t: json.loads((DEMO_ADAPTERS / t / "adapter_config.json").read_text()) for t in DEMO_TENANTS
    }
    expected = 0
    for name, shape in engine.linear_shapes.items():
        owners = [c for c in configs.values() if name.rsplit(".", 1)[-1] in c["target_modules"]]
        if owners:
            rank = max(c["r"] for c in owners)
            expected += len(owners) * rank * (shape.in_features + shape.out_features) * 4
    rows = [demo[t] for t in DEMO_TENANTS] + [None]
    assert engine.lora_batch(rows).nbytes == expected
    assert engine.lora_batch(rows * 5).nbytes == expected
    assert engine.lora_batch([demo["bank"]] * 4).nbytes == 0  # one adapter: plain matmuls
