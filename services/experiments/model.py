"""Experiment definitions as plain data, and their JSON form in Redis."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from functools import lru_cache


class Status(StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    STOPPED = "stopped"


class MetricKind(StrEnum):
    RATE = "rate"
    MEAN = "mean"


class Goal(StrEnum):
    INCREASE = "increase"
    DECREASE = "decrease"


@dataclass(frozen=True)
class VariantAdapter:
    name: str
    version: int = 0  # 0: the adapter's current version at serving time
    weight: float = 1.0  # composition weight


@dataclass(frozen=True)
class Variant:
    name: str
    adapters: tuple[VariantAdapter, ...] = ()  # empty: the base model
    traffic_weight: float = 0.0


@dataclass(frozen=True)
class Namespace:
    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Metric:
    name: str
    kind: MetricKind = MetricKind.RATE
    goal: Goal = Goal.INCREASE


DEFAULT_PRIMARY = Metric("success", MetricKind.RATE, Goal.INCREASE)


@dataclass(frozen=True)
class Experiment:
    key: str
    tenant: str
    variants: tuple[Variant, ...]
    coverage: float = 1.0
    hash_seed: str = ""  # "" at create: the key
    hash_version: int = 2
    namespace: Namespace | None = None
    status: Status = Status.DRAFT
    primary_metric: Metric = DEFAULT_PRIMARY
    guardrail_metrics: tuple[Metric, ...] = ()
    minimum_detectable_effect: float = 0.0  # 0: the configured default
    target_power: float = 0.0
    alpha: float = 0.0
    description: str = ""
    bucket_version: int = 1
    create_time: float = 0.0
    update_time: float = 0.0
    start_time: float = 0.0
    stop_time: float = 0.0
    bucket_time: float = 0.0  # when the current bucket version began (0: at start)

    @property
    def weights(self) -> list[float]:
        return [v.traffic_weight for v in self.variants]

    @property
    def namespace_tuple(self) -> tuple[str, float, float] | None:
        ns = self.namespace
        return None if ns is None else (ns.name, ns.start, ns.end)

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return (self.primary_metric, *self.guardrail_metrics)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _metric(d: dict) -> Metric:
    return Metric(d["name"], MetricKind(d["kind"]), Goal(d["goal"]))


@lru_cache(maxsize=4096)
def from_json(raw: bytes | str) -> Experiment:
    """Parsed once per distinct stored value (Assign reads the definition on every call)."""
    d = json.loads(raw)
    d["variants"] = tuple(
        Variant(
            v["name"],
            tuple(VariantAdapter(**a) for a in v["adapters"]),
            v["traffic_weight"],
        )
        for v in d["variants"]
    )
    d["namespace"] = Namespace(**d["namespace"]) if d["namespace"] else None
    d["status"] = Status(d["status"])
    d["primary_metric"] = _metric(d["primary_metric"])
    d["guardrail_metrics"] = tuple(_metric(m) for m in d["guardrail_metrics"])
    return Experiment(**d)
