"""A job's training parameters: the server's defaults filled in, every value range-checked."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from services.common.errors import InvalidArgument
from services.training.settings import TrainingSettings

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class Method(enum.StrEnum):
    SFT = "sft"
    DPO = "dpo"


def parse_method(value: str) -> Method:
    try:
        return Method(value)
    except ValueError:
        raise InvalidArgument(
            f"unknown training method {value!r}; use sft or dpo", reason="UNKNOWN_METHOD"
        ) from None


@dataclass(frozen=True)
class TrainingParams:
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    lora_dropout: float
    learning_rate: float
    epochs: int
    max_steps: int  # 0: epochs decide
    batch_size: int
    seed: int
    heldout_fraction: float
    max_length: int
    dpo_beta: float
    append_eos: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingParams:
        data = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


def _bad(name: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{name} {message}", reason="PARAM_OUT_OF_RANGE", field=name)


def _check(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise _bad(name, f"must be in {bracket}{low}, {high}], got {value}")


def resolve_params(given: dict[str, Any], settings: TrainingSettings) -> TrainingParams:
    """`given` holds only the fields the caller set; the rest are the server's defaults."""
    s = settings
    rank = int(given.get("rank", s.default_rank))
    _check("rank", rank, 1, s.max_rank)
    alpha = float(given.get("lora_alpha", 2 * rank))
    _check("lora_alpha", alpha, 0, 1e4, open_low=True)
    modules = tuple(given.get("target_modules") or s.default_target_modules)
    if len(set(modules)) != len(modules) or not all(_MODULE.fullmatch(m) for m in modules):
        raise _bad("target_modules", "must be distinct module names (letters, digits, '_')")
    dropout = float(given.get("lora_dropout", 0.0))
    _check("lora_dropout", dropout, 0, 0.9)
    lr = float(given.get("learning_rate", s.default_learning_rate))
    _check("learning_rate", lr, 0, 0.1, open_low=True)
    epochs = int(given.get("epochs", s.default_epochs))
    _check("epochs", epochs, 1, s.max_epochs)
    max_steps = int(given.get("max_steps", 0))
    _check("max_steps", max_steps, 0, s.max_steps_limit)
    batch = int(given.get("batch_size", s.default_batch_size))
    _check("batch_size", batch, 1, s.max_batch_size)
    seed = int(given.get("seed", s.default_seed))
    _check("seed", seed, 0, 2**32 - 1)
    fraction = float(given.get("heldout_fraction", s.default_heldout_fraction))
    _check("heldout_fraction", fraction, 0, 0.5, open_low=True)
    max_length = int(given.get("max_length", s.default_max_length))
    _check("max_length", max_length, 8, 1 << 16)
    beta = float(given.get("dpo_beta", s.default_dpo_beta))
    _check("dpo_beta", beta, 0, 100, open_low=True)
    append_eos = bool(given.get("append_eos", s.default_append_eos))
    return TrainingParams(
        rank, alpha, modules, dropout, lr, epochs, max_steps, batch, seed, fraction,
        max_length, beta, append_eos,
    )  # fmt: skip
