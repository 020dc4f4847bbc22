"""Every number an adapter brings to the model is checked at upload: malformed configs and
weights are refused with a reason (400), never an INTERNAL error, never a NaN in a batch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as save_safetensors

from services.common.errors import InvalidArgument
from services.inference.lora import MAX_ABS_WEIGHT, parse_adapter
from tests.helpers import DEMO_ADAPTERS, adapter_files

DEMO = adapter_files(DEMO_ADAPTERS / "retailer")
DEMO_CONFIG = json.loads(DEMO["adapter_config.json"])


@pytest.fixture(scope="module")
def linear_shapes():
    from services.inference.engine import Engine
    from services.inference.settings import InferenceSettings

    return Engine(InferenceSettings().model_dir, device="cpu", dtype="float32").linear_shapes


def parse(linear_shapes, config: bytes, weights: bytes = DEMO["adapter_model.safetensors"]):
    return parse_adapter(config, weights, linear_shapes, dtype=torch.float32)


def with_config(**changes) -> bytes:
    return json.dumps(DEMO_CONFIG | changes).encode()


def demo_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(DEMO["adapter_model.safetensors"])


def test_the_demo_adapter_passes(linear_shapes):
    assert parse(linear_shapes, DEMO["adapter_config.json"]).rank == DEMO_CONFIG["r"]


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (with_config(target_modules="q_proj(("), "BAD_CONFIG"),  # a broken regex
        (with_config(target_modules=[1, 2]), "BAD_CONFIG"),
        (with_config(target_modules={"q_proj": 1}), "BAD_CONFIG"),
        (with_config(lora_alpha="sixteen"), "BAD_CONFIG"),
        (with_config(lora_alpha=True), "BAD_CONFIG"),
        (with_config(lora_alpha=0), "BAD_CONFIG"),
        (with_config(lora_alpha=1e9), "BAD_CONFIG"),
        # Python's json reads NaN and Infinity; PEFT writes them when alpha was one.
        (with_config(lora_alpha=float("nan")), "BAD_CONFIG"),
        (with_config(lora_alpha=float("inf")), "BAD_CONFIG"),
        (with_config(r=0), "BAD_CONFIG"),
        (with_config(r="8"), "BAD_CONFIG"),
        (with_config(alpha_pattern={"q_proj": "big"}), "BAD_CONFIG"),
        (with_config(alpha_pattern={"q_proj((": 8}), "BAD_CONFIG"),
        (with_config(alpha_pattern=[1]), "BAD_CONFIG"),
        (with_config(rank_pattern={"q_proj": -1}), "BAD_CONFIG"),
        (with_config(use_rslora="yes"), "BAD_CONFIG"),
        (b"[" * 100_000 + b"]" * 100_000, "BAD_CONFIG"),  # nesting deeper than the parser
    ],
)
def test_malformed_configs_are_refused_with_the_reason(linear_shapes, config, reason):
    with pytest.raises(InvalidArgument) as info:
        parse(linear_shapes, config)
    assert info.value.reason == reason


def poisoned_weights(change) -> bytes:
    tensors = demo_tensors()
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key] = change(tensors[key])
    return save_safetensors(tensors)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t: torch.full_like(t, float("nan")), "NON_FINITE_WEIGHTS"),
        (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "NON_FINITE_WEIGHTS"),
        (lambda t: torch.full_like(t, MAX_ABS_WEIGHT * 2), "WEIGHTS_OUT_OF_RANGE"),
        (lambda t: t.to(torch.int32), "BAD_WEIGHTS"),
        (lambda t: t[:, :0].contiguous(), "BAD_WEIGHTS"),  # rank 0
        (lambda t: torch.tensor(1.0), "BAD_WEIGHTS"),  # a scalar
        (lambda t: t.unsqueeze(0).contiguous(), "BAD_WEIGHTS"),  # 3-D
        (lambda t: t[:, :-1].contiguous(), "BASE_MODEL_MISMATCH"),  # B's rank is not A's
    ],
)
def test_malformed_weights_are_refused_with_the_reason(linear_shapes, change, reason):
    with pytest.raises(InvalidArgument) as info:
        parse(linear_shapes, DEMO["adapter_config.json"], poisoned_weights(change))
    assert info.value.reason == reason


def test_half_precision_weights_are_checked_too(linear_shapes):
    weights = poisoned_weights(lambda t: torch.full_like(t, float("inf")).to(torch.float16))
    with pytest.raises(InvalidArgument) as info:
        parse(linear_shapes, DEMO["adapter_config.json"], weights)
    assert info.value.reason == "NON_FINITE_WEIGHTS"
