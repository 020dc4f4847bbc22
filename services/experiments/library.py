"""Library API: the experiments domain in-process, without gRPC.

    from services import get_ab_framework

    ab = get_ab_framework(redis_url="redis://localhost:6379/0")
    await ab.create_experiment("retailer", "support-v2", [
        {"name": "control", "adapters": ["support"], "traffic_weight": 0.5},
        {"name": "treatment", "adapters": ["support-v2"], "traffic_weight": 0.5},
    ])
    await ab.start("retailer", "support-v2")
    variant = (await ab.assign("retailer", "support-v2", user_id)).variant

Same validation, Redis state and errors (services.common.errors) as the gRPC service, so
the two can be mixed against the same Redis.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis

from services.common.redis import EmbeddedRedis, connect
from services.experiments.analytics_source import AnalyticsSource
from services.experiments.core import Assignment, ExperimentStore, Outcome, Update
from services.experiments.model import (
    DEFAULT_PRIMARY,
    Experiment,
    Goal,
    Metric,
    MetricKind,
    Namespace,
    Status,
    Variant,
    VariantAdapter,
)
from services.experiments.reporting import experiment_results
from services.experiments.results import Results, analyze
from services.experiments.settings import ExperimentsSettings
from services.experiments.stats import Aggregate

VariantSpec = Variant | Mapping[str, Any]
MetricSpec = Metric | Mapping[str, Any] | str


def _adapter(spec: VariantAdapter | Mapping[str, Any] | str) -> VariantAdapter:
    if isinstance(spec, VariantAdapter):
        return spec
    if isinstance(spec, str):
        return VariantAdapter(spec)
    return VariantAdapter(spec["name"], int(spec.get("version", 0)), spec.get("weight", 1.0))


def _variant(spec: VariantSpec) -> Variant:
    if isinstance(spec, Variant):
        return spec
    return Variant(
        spec["name"],
        tuple(_adapter(a) for a in spec.get("adapters", ())),
        spec.get("traffic_weight", spec.get("weight", 0.0)),
    )


def _metric(spec: MetricSpec) -> Metric:
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        return Metric(spec)
    return Metric(
        spec["name"],
        MetricKind(spec.get("kind", "rate")),
        Goal(spec.get("goal", "increase")),
    )


class ABTestingFramework:
    """A/B experiments between adapters: define, start/stop, assign, read results."""

    def __init__(self, redis: aioredis.Redis, settings: ExperimentsSettings | None = None) -> None:
        """With settings.analytics_addr, results read success, latency, time to first token
        and rating from the analytics service, as the gRPC service does."""
        self.redis = redis
        self._owns_redis = False  # get_ab_framework() sets it for connections it opened
        self.settings = settings or ExperimentsSettings()
        self.store = ExperimentStore(redis, self.settings.definition_cache_seconds)
        s = self.settings
        self.analytics = (
            AnalyticsSource(
                s.analytics_addr,
                s.analytics_timeout_seconds,
                s.analytics_max_window_seconds,
                s.base_model_name,
            )
            if s.analytics_addr
            else None
        )
        self._embedded: EmbeddedRedis | None = None

    async def create_experiment(
        self,
        tenant: str,
        key: str,
        variants: Iterable[VariantSpec],
        *,
        coverage: float = 1.0,
        hash_seed: str = "",
        hash_version: int = 2,
        namespace: tuple[str, float, float] | None = None,
        primary_metric: MetricSpec = DEFAULT_PRIMARY,
        guardrail_metrics: Iterable[MetricSpec] = (),
        minimum_detectable_effect: float = 0.0,
        target_power: float = 0.0,
        alpha: float = 0.0,
        description: str = "",
        start: bool = False,
    ) -> Experiment:
        exp = await self.store.create(
            Experiment(
                key=key,
                tenant=tenant,
                variants=tuple(_variant(v) for v in variants),
                coverage=coverage,
                hash_seed=hash_seed,
                hash_version=hash_version,
                namespace=Namespace(*namespace) if namespace else None,
                primary_metric=_metric(primary_metric),
                guardrail_metrics=tuple(_metric(m) for m in guardrail_metrics),
                minimum_detectable_effect=minimum_detectable_effect,
                target_power=target_power,
                alpha=alpha,
                description=description,
            )
        )
        return await self.start(tenant, key) if start else exp

    async def get_experiment(self, tenant: str, key: str) -> Experiment:
        return await self.store.get(tenant, key)

    async def list_experiments(
        self, tenant: str, status: Status | str | None = None
    ) -> list[Experiment]:
        out, token = [], ""
        while True:
            page, token = await self.store.list(
                tenant, 1000, token, Status(status) if status else None
            )
            out += page
            if not token:
                return out

    async def start(self, tenant: str, key: str) -> Experiment:
        return await self.store.update(tenant, key, Update(action="start"))

    async def stop(self, tenant: str, key: str) -> Experiment:
        return await self.store.update(tenant, key, Update(action="stop"))

    async def update_experiment(self, tenant: str, key: str, **changes: Any) -> Experiment:
        """Keyword arguments as services.experiments.core.Update: traffic_weights (variant
        name -> weight), coverage, description, minimum_detectable_effect, target_power,
        alpha, bump_bucket_version, action."""
        return await self.store.update(tenant, key, Update(**changes))

    async def assign(self, tenant: str, key: str, unit_id: str) -> Assignment:
        return await self.store.assign(tenant, key, unit_id)

    async def record_outcome(
        self, tenant: str, key: str, unit_id: str, metric: str, value: float
    ) -> bool:
        """False when the unit was never assigned into the experiment."""
        recorded, _ = await self.store.record_outcomes(
            tenant, [Outcome(key, unit_id, metric, value)]
        )
        return recorded == 1

    async def get_results(
        self,
        tenant: str,
        key: str,
        aggregates: dict[str, list[Aggregate]] | None = None,
        units_per_variant: list[int] | None = None,
    ) -> Results:
        """Results as GetResults gives them (analytics aggregates where configured, outcome
        counters otherwise; the sequential p-values' running minimum kept in Redis), or
        from aggregates you pass (metric name -> one Aggregate per variant, per unit)."""
        exp = await self.store.get(tenant, key)
        if aggregates is None and units_per_variant is None:
            return await experiment_results(self.store, exp, self.settings, self.analytics)
        if units_per_variant is None:
            units_per_variant = await self.store.units_per_variant(exp)
        if aggregates is None:
            aggregates = await self.store.aggregates(exp)
        return analyze(exp, units_per_variant, aggregates, self.settings)

    async def close(self) -> None:
        self.store.close()
        if self.analytics is not None:
            await self.analytics.close()
        if self._owns_redis:
            await self.redis.aclose()
        if self._embedded is not None:
            self._embedded.close()
            self._embedded = None


_default: ABTestingFramework | None = None


def get_ab_framework(
    redis_url: str | None = None,
    *,
    redis: aioredis.Redis | None = None,
    settings: ExperimentsSettings | None = None,
) -> ABTestingFramework:
    """The process-wide framework (created on first call). With redis or redis_url a new
    one is made for that server and becomes the default; with neither, REDIS_URL from the
    settings (config/ab_testing.yaml or the environment), else an embedded redis-server
    started for this process (as every service does without REDIS_URL)."""
    global _default
    if redis is None and redis_url is None and _default is not None:
        return _default
    settings = settings or ExperimentsSettings()
    embedded = None
    owns = redis is None
    if redis is None:
        url = redis_url or settings.redis_url
        if not url:
            embedded = EmbeddedRedis()
            url = embedded.url
        redis = connect(url)
    _default = ABTestingFramework(redis, settings)
    _default._embedded = embedded
    _default._owns_redis = owns
    return _default
