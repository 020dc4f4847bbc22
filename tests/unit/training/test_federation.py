"""LoRAFederation against an independent numpy computation of the weighted mean delta W."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services import FederationConfig, LoRAFederation
from services.common.errors import InvalidArgument
from services.training.federation import LoraAdapter, aggregate_ndarrays
from tests.helpers import DEMO_ADAPTERS, adapter_files

LAYERS = {"m.layers.0.q_proj": (24, 16), "m.layers.0.v_proj": (8, 16)}  # out, in


def random_adapter(seed: int, rank: int, alpha: float, base: str = "loraplex-tiny"):
    rng = np.random.default_rng(seed)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base,
    }
    a = {k: rng.normal(size=(rank, i)) for k, (o, i) in LAYERS.items()}
    b = {k: rng.normal(size=(o, rank)) for k, (o, i) in LAYERS.items()}
    return LoraAdapter(config, a, b)


def reference_mean(adapters, samples) -> dict[str, np.ndarray]:
    """sum_i n_i / sum(n) * (alpha_i / r_i) * B_i @ A_i, written out independently."""
    total = sum(samples)
    out = {}
    for layer in LAYERS:
        acc = np.zeros(LAYERS[layer])
        for ad, n in zip(adapters, samples, strict=True):
            scale = ad.config["lora_alpha"] / ad.config["r"]
            acc += (n / total) * scale * (ad.b[layer] @ ad.a[layer])
        out[layer] = acc
    return out


def relative_error(merged, reference) -> float:
    num = den = 0.0
    for layer, want in reference.items():
        got = merged.scaling * (
            merged.b[layer].astype(np.float32).astype(np.float64)
            @ merged.a[layer].astype(np.float32).astype(np.float64)
        )
        num += float(np.sum((got - want) ** 2))
        den += float(np.sum(want**2))
    return (num / den) ** 0.5


ADAPTERS = [random_adapter(1, 4, 8), random_adapter(2, 6, 6), random_adapter(3, 2, 16)]
SAMPLES = [100, 300, 50]


def test_stack_is_the_exact_weighted_mean():
    merged = LoRAFederation(FederationConfig("stack")).aggregate(ADAPTERS, SAMPLES)
    reference = reference_mean(ADAPTERS, SAMPLES)
    assert merged.rank == 12
    assert relative_error(merged, reference) <= 1e-6
    assert merged.relative_error == pytest.approx(relative_error(merged, reference), abs=1e-9)
    assert merged.weights == pytest.approx([100 / 450, 300 / 450, 50 / 450])


def test_svd_error_is_the_best_rank_r_error():
    reference = reference_mean(ADAPTERS, SAMPLES)
    for rank in (2, 4, 8, 12):
        merged = LoRAFederation(FederationConfig("svd", rank=rank)).aggregate(ADAPTERS, SAMPLES)
        # Eckart-Young: the best rank-r error is the norm of the discarded singular values.
        tail = sum(
            float(np.sum(np.linalg.svd(m, compute_uv=False)[rank:] ** 2))
            for m in reference.values()
        )
        norm = sum(float(np.sum(m**2)) for m in reference.values())
        assert relative_error(merged, reference) == pytest.approx((tail / norm) ** 0.5, abs=1e-6)
    assert relative_error(merged, reference) <= 1e-6  # rank 12 = sum of ranks: exact


def test_fedavg_averages_factors_and_is_inexact():
    same = [random_adapter(s, 4, 8) for s in (4, 5)]
    merged = LoRAFederation(FederationConfig("fedavg")).aggregate(same, [1, 3])
    np.testing.assert_allclose(
        merged.a["m.layers.0.q_proj"],
        0.25 * same[0].a["m.layers.0.q_proj"] + 0.75 * same[1].a["m.layers.0.q_proj"],
    )
    assert merged.rank == 4 and merged.config["lora_alpha"] == 8
    assert merged.relative_error > 0.1  # mean of products != product of means
    # With a shared A, averaging B is exact.
    shared_a = [random_adapter(4, 4, 8), random_adapter(5, 4, 8)]
    shared_a[1].a = shared_a[0].a
    exact = LoRAFederation(FederationConfig("fedavg")).aggregate(shared_a, [1, 3])
    assert exact.relative_error <= 1e-6


def test_saved_files_round_trip_through_safetensors(tmp_path):
    merged = LoRAFederation(FederationConfig("stack")).aggregate(ADAPTERS, SAMPLES)
    loaded = LoraAdapter.from_dir(merged.save(tmp_path))
    assert loaded.rank == 12 and loaded.scaling == 1.0
    assert relative_error(loaded, reference_mean(ADAPTERS, SAMPLES)) <= 1e-6


@pytest.mark.parametrize(
    ("adapters", "config", "reason"),
    [
        ([random_adapter(1, 4, 8), random_adapter(2, 6, 8)], "fedavg", "FEDAVG_NEEDS_EQUAL_RANKS"),
        (
            [random_adapter(1, 4, 8), random_adapter(2, 4, 8, base="other")],
            "stack",
            "BASE_MODEL_MISMATCH",
        ),
        ([random_adapter(1, 4, 8)], "stack", "TOO_FEW_ADAPTERS"),
    ],
)
def test_incompatible_adapters_are_refused(adapters, config, reason):
    with pytest.raises(InvalidArgument) as err:
        LoRAFederation(FederationConfig(config)).aggregate(adapters)
    assert err.value.reason == reason


def test_demo_adapters_with_other_target_modules_are_refused():
    files = [adapter_files(DEMO_ADAPTERS / t) for t in ("retailer", "bank")]
    adapters = [
        LoraAdapter.from_files(f["adapter_config.json"], f["adapter_model.safetensors"])
        for f in files
    ]
    with pytest.raises(InvalidArgument) as err:
        LoRAFederation(FederationConfig("stack")).aggregate(adapters)
    assert err.value.reason == "TARGET_MODULES_MISMATCH"


def test_bad_config_and_weights():
    with pytest.raises(InvalidArgument) as err:
        FederationConfig("median")
    assert err.value.reason == "UNKNOWN_FEDERATION_METHOD"
    with pytest.raises(InvalidArgument) as err:
        LoRAFederation(FederationConfig("stack")).aggregate(ADAPTERS[:2], [1, -1])
    assert err.value.reason == "BAD_WEIGHTS"
    config = json.loads(adapter_files(DEMO_ADAPTERS / "bank")["adapter_config.json"])
    config["rank_pattern"] = {"q_proj": 4}
    with pytest.raises(InvalidArgument) as err:
        LoraAdapter.from_files(json.dumps(config).encode(), b"")
    assert err.value.reason in {"UNSUPPORTED_ADAPTER", "BAD_ADAPTER"}


def test_flower_shaped_aggregation_matches_the_library():
    layers = sorted(LAYERS)
    results = [
        ([m for layer in layers for m in (ad.a[layer], ad.b[layer])], n)
        for ad, n in zip(ADAPTERS, SAMPLES, strict=True)
    ]
    config = {
        "peft_type": "LORA",
        "r": 0,
        "lora_alpha": 1.0,
        "target_modules": ["q_proj", "v_proj"],
    }
    # Flower clients send factors only: give them one scaling (here each adapter's is
    # folded into B so that alpha / r = 1 in the config above is right for all).
    for (arrays, _), ad in zip(results, ADAPTERS, strict=True):
        for i in range(1, len(arrays), 2):
            arrays[i] = arrays[i] * ad.scaling
    per_rank = []
    for arrays, n in results:
        per_rank.append(([*arrays], n))
    out = aggregate_ndarrays(
        [(arrays, n) for arrays, n in per_rank],
        layers,
        {**config, "r": 1, "lora_alpha": 1.0},
        LoRAFederation(FederationConfig("stack")),
    )
    reference = reference_mean(ADAPTERS, SAMPLES)
    for i, layer in enumerate(layers):
        np.testing.assert_allclose(out[2 * i + 1] @ out[2 * i], reference[layer], atol=1e-9)
