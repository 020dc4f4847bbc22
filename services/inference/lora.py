"""Parsing and validation of PEFT LoRA adapters against the loaded base model.

Only safetensors bytes are ever deserialized (safetensors.torch.load: no pickle). Every
tensor is checked against the base model's modules, so an adapter trained for another
architecture is refused with the reason instead of failing mid-request.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from services.common.errors import InvalidArgument

_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scaling: float


@dataclass
class LoraWeights:
    """One adapter's low-rank factors per base-model module, ready to apply."""

    modules: dict[str, LoraModule]
    rank: int
    lora_alpha: float
    target_modules: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(
            m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
            for m in self.modules.values()
        )

    def to(self, device: torch.device | str) -> LoraWeights:
        """A copy on another device (from pinned host memory when copying to CUDA)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "cpu" and torch.device(device).type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        modules = {
            name: LoraModule(move(m.a), move(m.b), m.scaling) for name, m in self.modules.items()
        }
        return LoraWeights(modules, self.rank, self.lora_alpha, list(self.target_modules))


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    # PEFT's rule: a pattern key matches a module name ending in ".<key>" (or equal to it).
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def parse_config(raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(
            f"adapter_config.json is not valid JSON: {err}", reason="BAD_CONFIG"
        ) from err
    if not isinstance(config, dict):
        raise InvalidArgument("adapter_config.json must be a JSON object", reason="BAD_CONFIG")
    if config.get("peft_type") != "LORA":
        raise InvalidArgument(
            f"only LoRA adapters are supported, got peft_type={config.get('peft_type')!r}",
            reason="UNSUPPORTED_ADAPTER",
        )
    unsupported = {
        "use_dora": config.get("use_dora"),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "modules_to_save": config.get("modules_to_save"),
    }
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    named = [k for k, v in unsupported.items() if v]
    if named:
        raise InvalidArgument(
            f"unsupported LoRA options: {', '.join(named)}", reason="UNSUPPORTED_ADAPTER"
        )
    return config


def check_target_modules(config: dict, linear_names: list[str]) -> None:
    """Every configured target must name at least one linear layer of the base model."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in linear_names):
            raise InvalidArgument(
                f"target_modules pattern {targets!r} matches no layer of the base model",
                reason="TARGET_MODULES_NOT_FOUND",
            )
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if missing:
        raise InvalidArgument(
            f"target modules not in the base model: {', '.join(sorted(missing))}",
            reason="TARGET_MODULES_NOT_FOUND",
        )


def parse_adapter(
    config_bytes: bytes,
    weights_bytes: bytes,
    base_linears: dict[str, LinearShape],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> LoraWeights:
    """Validate a PEFT adapter against the base model's linear layers and return its factors."""
    config = parse_config(config_bytes)
    check_target_modules(config, list(base_linears))
    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise InvalidArgument(
            f"adapter_model.safetensors is not a valid safetensors file: {err}",
            reason="BAD_WEIGHTS",
        ) from err
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise InvalidArgument(
                f"unexpected tensor {key!r}: only lora_A/lora_B weights are supported",
                reason="UNSUPPORTED_ADAPTER",
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise InvalidArgument("adapter contains no LoRA weights", reason="BAD_WEIGHTS")

    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for name, ab in sorted(parts.items()):
        shape = base_linears.get(name)
        if shape is None:
            raise InvalidArgument(
                f"adapter weights target {name!r}, which the base model does not have: "
                "it was trained for another base model",
                reason="BASE_MODEL_MISMATCH",
            )
        if set(ab) != {"A", "B"}:
            raise InvalidArgument(
                f"{name}: lora_A and lora_B are both needed", reason="BAD_WEIGHTS"
            )
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[1] != shape.in_features
            or b.shape
            != (
                shape.out_features,
                rank,
            )
        ):
            raise InvalidArgument(
                f"{name}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the base "
                f"layer ({shape.in_features} -> {shape.out_features}): it was trained for "
                "another base model",
                reason="BASE_MODEL_MISMATCH",
            )
        module_alpha = _pattern_value(alpha_pattern, name, alpha)
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        modules[name] = LoraModule(
            a=a.to(device=device, dtype=dtype).contiguous(),
            b=b.to(device=device, dtype=dtype).contiguous(),
            scaling=scale,
        )
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    rank = max(m.a.shape[0] for m in modules.values())
    return LoraWeights(modules=modules, rank=rank, lora_alpha=alpha, target_modules=targets)
