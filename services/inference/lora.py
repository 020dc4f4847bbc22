"""Parsing and validation of PEFT LoRA adapters against the loaded base model.

Only safetensors bytes are ever deserialized (safetensors.torch.load: no pickle). Every
tensor is checked against the base model's modules, so an adapter trained for another
architecture is refused with the reason instead of failing mid-request. Every number that
reaches the model is checked too (finite, within the bounds below), at upload and at every
load: one tenant's NaN must not reach a batch it shares with others.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from services.common.errors import InvalidArgument

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")

# Bounds on an adapter's numbers: far beyond what training produces (|entries| well under
# 10, alpha a small multiple of the rank), well short of what overflows a forward pass.
MAX_LORA_ALPHA = 4096.0
MAX_ABS_WEIGHT = 1e4
MAX_RANK = 1024


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


def _bad_config(message: str) -> InvalidArgument:
    return InvalidArgument(f"adapter_config.json: {message}", reason="BAD_CONFIG")


def _check_regex(pattern: object, field_name: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise _bad_config(f"{field_name} must be non-empty strings, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise _bad_config(f"{field_name} {pattern!r} is not a valid pattern: {err}") from err
    return pattern


def _check_alpha(value: object, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad_config(f"{field_name} must be a number, got {value!r}")
    if not (math.isfinite(value) and 0 < value <= MAX_LORA_ALPHA):
        raise _bad_config(f"{field_name} must be in (0, {MAX_LORA_ALPHA:g}], got {value!r}")
    return float(value)


def _check_rank(value: object, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise _bad_config(f"{field_name} must be an integer in [1, {MAX_RANK}], got {value!r}")
    return value


def _check_pattern_map(config: dict, field_name: str, check_value) -> None:
    patterns = config.get(field_name) or {}
    if not isinstance(patterns, dict):
        raise _bad_config(f"{field_name} must be an object")
    for pattern, value in patterns.items():
        _check_regex(pattern, f"{field_name} keys")
        check_value(value, f"{field_name}[{pattern!r}]")


def parse_config(raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
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
    if "r" in config:
        _check_rank(config["r"], "r")
    if "lora_alpha" in config:
        _check_alpha(config["lora_alpha"], "lora_alpha")
    _check_pattern_map(config, "alpha_pattern", _check_alpha)
    _check_pattern_map(config, "rank_pattern", _check_rank)
    if not isinstance(config.get("use_rslora", False), bool):
        raise _bad_config("use_rslora must be true or false")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_regex(targets, "target_modules")
    elif targets is not None and not (
        isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)
    ):
        raise _bad_config("target_modules must be a pattern or a list of module names")
    return config


def _check_factor(name: str, part: str, tensor: torch.Tensor) -> None:
    """A LoRA factor is a 2-D floating-point matrix of finite, bounded numbers."""
    if not tensor.is_floating_point() or tensor.ndim != 2 or 0 in tensor.shape:
        raise InvalidArgument(
            f"{name}: lora_{part} must be a non-empty 2-D floating-point matrix, got "
            f"{tensor.dtype} {tuple(tensor.shape)}",
            reason="BAD_WEIGHTS",
        )
    if tensor.shape[0 if part == "A" else 1] > MAX_RANK:
        raise InvalidArgument(f"{name}: rank above {MAX_RANK}", reason="BAD_WEIGHTS")
    values = tensor.float()
    if not bool(torch.isfinite(values).all()):
        raise InvalidArgument(
            f"{name}: lora_{part} holds NaN or infinite numbers", reason="NON_FINITE_WEIGHTS"
        )
    if float(values.abs().max()) > MAX_ABS_WEIGHT:
        raise InvalidArgument(
            f"{name}: lora_{part} has entries beyond ±{MAX_ABS_WEIGHT:g}",
            reason="WEIGHTS_OUT_OF_RANGE",
        )


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

    alpha = float(config.get("lora_alpha", 8))  # PEFT's default
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
        _check_factor(name, "A", a)
        _check_factor(name, "B", b)
        rank = a.shape[0]
        if a.shape[1] != shape.in_features or b.shape != (shape.out_features, rank):
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
