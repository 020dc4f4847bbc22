"""Federation of LoRA adapters: several participants' adapters on one base, aggregated into
one, weighted by their sample counts.

    from services import LoRAFederation, FederationConfig

    federation = LoRAFederation(FederationConfig(method="svd", rank=8))
    result = federation.aggregate([adapter_a, adapter_b], num_samples=[1200, 300])
    result.save("federated/")                # a PEFT adapter directory (safetensors)

For each target layer, participant i contributes dW_i = s_i B_i A_i (s_i = alpha_i / r_i),
and with weights w_i = n_i / sum(n) the target is the weighted mean dW = sum_i w_i dW_i:

  fedavg  A = sum_i w_i A_i, B = sum_i w_i B_i (equal ranks and scalings): FedAvg's
          baseline; inexact, since the mean of products is not the product of means.
  stack   A = [A_1; ...; A_k], B = [w_1 s_1 B_1, ..., w_k s_k B_k], rank sum(r_i), scaling 1:
          exactly the weighted mean dW.
  svd     the weighted mean dW's best rank-r approximation (Eckart-Young): B = U_r S_r,
          A = V_r^T, scaling 1.

Adapters are read from safetensors only. This runs on the adapters' factors alone (no base
model), in float64, and stores float32. Flower (flwr) cannot be installed next to this
project's protobuf 7 (every flwr release pins protobuf < 7), so there is no Flower
Strategy class here; `aggregate_ndarrays` takes and returns the lists of numpy arrays a
Flower strategy's aggregate_fit handles, for sites that run Flower themselves.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import InvalidArgument

METHODS = ("fedavg", "stack", "svd")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LAYER = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass(frozen=True)
class FederationConfig:
    """method: fedavg, stack or svd; rank: svd's target rank (None: the largest input rank)."""

    method: str = "fedavg"
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(
                f"unknown federation method {self.method!r}; use one of {', '.join(METHODS)}",
                reason="UNKNOWN_FEDERATION_METHOD",
            )
        if self.rank is not None and self.rank < 1:
            raise InvalidArgument("rank must be 1 or more", reason="BAD_RANK")


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: its adapter_config.json and its factors, by layer."""

    config: dict[str, Any]
    a: dict[str, np.ndarray]  # layer -> A [r, in]
    b: dict[str, np.ndarray]  # layer -> B [out, r]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        alpha, r = float(self.config["lora_alpha"]), self.rank
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def target_modules(self) -> list[str]:
        modules = self.config.get("target_modules") or []
        return sorted([modules] if isinstance(modules, str) else modules)

    @property
    def base_model(self) -> str:
        return Path(str(self.config.get("base_model_name_or_path") or "")).name

    def delta(self, layer: str) -> np.ndarray:
        return self.scaling * (self.b[layer] @ self.a[layer])

    @classmethod
    def from_files(cls, config: bytes, weights: bytes) -> LoraAdapter:
        from safetensors.numpy import load

        try:
            body = json.loads(config)
            tensors = load(weights)
        except Exception as err:
            raise InvalidArgument(
                "not a PEFT adapter (adapter_config.json + safetensors)", reason="BAD_ADAPTER"
            ) from err
        if body.get("peft_type") != "LORA" or body.get("rank_pattern") or body.get("alpha_pattern"):
            raise InvalidArgument(
                "only plain LoRA adapters (one rank and alpha for every layer) can be federated",
                reason="UNSUPPORTED_ADAPTER",
            )
        a, b = {}, {}
        for name, tensor in tensors.items():
            match = _LAYER.match(name)
            if match is None:
                raise InvalidArgument(
                    f"unexpected tensor {name!r} in the adapter", reason="UNSUPPORTED_ADAPTER"
                )
            target = a if match["factor"] == "A" else b
            target[match["module"]] = tensor.astype(np.float64)
        if set(a) != set(b) or not a:
            raise InvalidArgument(
                "the adapter's A and B factors do not pair up", reason="BAD_ADAPTER"
            )
        return cls(body, a, b)

    @classmethod
    def from_dir(cls, directory: str | Path) -> LoraAdapter:
        d = Path(directory)
        return cls.from_files((d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes())


@dataclass
class FederatedAdapter(LoraAdapter):
    weights: list[float] = field(default_factory=list)
    # ||dW_agg - weighted mean dW||_F / ||weighted mean dW||_F over all layers.
    relative_error: float = 0.0

    def files(self) -> dict[str, bytes]:
        from safetensors.numpy import save

        tensors: dict[str, np.ndarray] = {}
        for layer in sorted(self.a):
            tensors[f"{layer}.lora_A.weight"] = np.ascontiguousarray(self.a[layer], np.float32)
            tensors[f"{layer}.lora_B.weight"] = np.ascontiguousarray(self.b[layer], np.float32)
        config = json.dumps(self.config, indent=2, sort_keys=True).encode() + b"\n"
        return {CONFIG_FILE: config, WEIGHTS_FILE: save(tensors)}

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, content in self.files().items():
            (d / name).write_bytes(content)
        return d


def normalized_weights(num_samples: Sequence[float], count: int) -> list[float]:
    if len(num_samples) != count:
        raise InvalidArgument("give one sample count per adapter", reason="BAD_WEIGHTS")
    if any(not math.isfinite(n) or n < 0 for n in num_samples):
        raise InvalidArgument("sample counts must be finite and >= 0", reason="BAD_WEIGHTS")
    total = float(sum(num_samples))
    if total == 0:
        return [1.0 / count] * count
    return [float(n) / total for n in num_samples]


def check_compatible(adapters: Sequence[LoraAdapter]) -> None:
    """Same base model, same target modules, same layers with the same shapes."""
    if len(adapters) < 2:
        raise InvalidArgument("a federation needs two or more adapters", reason="TOO_FEW_ADAPTERS")
    first = adapters[0]
    for i, other in enumerate(adapters[1:], start=1):
        if other.base_model != first.base_model:
            raise InvalidArgument(
                f"adapter {i} is for base model {other.base_model!r}, adapter 0 for "
                f"{first.base_model!r}",
                reason="BASE_MODEL_MISMATCH",
            )
        if other.target_modules != first.target_modules or set(other.a) != set(first.a):
            raise InvalidArgument(
                f"adapter {i} targets {other.target_modules}, adapter 0 {first.target_modules}: "
                "federated adapters must target the same modules",
                reason="TARGET_MODULES_MISMATCH",
            )
        for layer in first.a:
            if (
                other.a[layer].shape[1] != first.a[layer].shape[1]
                or other.b[layer].shape[0] != first.b[layer].shape[0]
            ):
                raise InvalidArgument(
                    f"layer {layer} has other shapes in adapter {i}: another base model",
                    reason="BASE_MODEL_MISMATCH",
                )


def weighted_mean_delta(adapters: Sequence[LoraAdapter], weights: Sequence[float], layer: str):
    return sum(w * ad.delta(layer) for ad, w in zip(adapters, weights, strict=True))


class LoRAFederation:
    def __init__(self, config: FederationConfig | None = None) -> None:
        self.config = config or FederationConfig()

    def aggregate(
        self, adapters: Sequence[LoraAdapter], num_samples: Sequence[float] | None = None
    ) -> FederatedAdapter:
        check_compatible(adapters)
        weights = normalized_weights(
            num_samples if num_samples is not None else [1] * len(adapters), len(adapters)
        )
        method = self.config.method
        first = adapters[0]
        if method == "fedavg" and (
            len({ad.rank for ad in adapters}) > 1 or len({ad.scaling for ad in adapters}) > 1
        ):
            raise InvalidArgument(
                "fedavg averages the factors themselves: every adapter needs the same rank and "
                "lora_alpha (use stack or svd otherwise)",
                reason="FEDAVG_NEEDS_EQUAL_RANKS",
            )
        rank = {"fedavg": first.rank, "stack": sum(ad.rank for ad in adapters)}.get(
            method, self.config.rank or max(ad.rank for ad in adapters)
        )
        a_out, b_out = {}, {}
        error_sq = norm_sq = 0.0
        for layer in sorted(first.a):
            target = weighted_mean_delta(adapters, weights, layer)
            if method == "fedavg":
                a = sum(w * ad.a[layer] for ad, w in zip(adapters, weights, strict=True))
                b = sum(w * ad.b[layer] for ad, w in zip(adapters, weights, strict=True))
                scale = first.scaling
            elif method == "stack":
                a = np.concatenate([ad.a[layer] for ad in adapters], axis=0)
                b = np.concatenate(
                    [w * ad.scaling * ad.b[layer] for ad, w in zip(adapters, weights, strict=True)],
                    axis=1,
                )
                scale = 1.0
            else:
                u, s, vh = np.linalg.svd(target, full_matrices=False)
                keep = min(rank, len(s))  # a layer of lower rank is padded with zeros
                a = np.zeros((rank, target.shape[1]))
                b = np.zeros((target.shape[0], rank))
                a[:keep], b[:, :keep] = vh[:keep], u[:, :keep] * s[:keep]
                scale = 1.0
            a_out[layer], b_out[layer] = a, b
            # measured on what is stored (float32), as served
            got = scale * (b.astype(np.float32).astype(np.float64) @ a.astype(np.float32))
            error_sq += float(np.sum((got - target) ** 2))
            norm_sq += float(np.sum(target**2))
        config = {
            **first.config,
            "r": rank,
            "lora_alpha": first.config["lora_alpha"] if method == "fedavg" else rank,
            "use_rslora": first.config.get("use_rslora", False) if method == "fedavg" else False,
            "target_modules": first.target_modules,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        }
        error = math.sqrt(error_sq / norm_sq) if norm_sq > 0 else 0.0
        return FederatedAdapter(config, a_out, b_out, weights=weights, relative_error=error)


def aggregate_ndarrays(
    results: Sequence[tuple[list[np.ndarray], int]],
    layers: Sequence[str],
    config: dict[str, Any],
    federation: LoRAFederation | None = None,
) -> list[np.ndarray]:
    """Flower's shape: each client's parameters as [A_0, B_0, A_1, B_1, ...] in `layers`
    order, with its number of examples; the aggregate in the same order (its rank may
    differ: stack and svd change it)."""
    adapters = [
        LoraAdapter(
            dict(config),
            {layer: arrays[2 * i].astype(np.float64) for i, layer in enumerate(layers)},
            {layer: arrays[2 * i + 1].astype(np.float64) for i, layer in enumerate(layers)},
        )
        for arrays, _ in results
    ]
    merged = (federation or LoRAFederation()).aggregate(adapters, [n for _, n in results])
    return [m for layer in layers for m in (merged.a[layer], merged.b[layer])]
