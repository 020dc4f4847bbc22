from __future__ import annotations

from services.common.settings import ServiceSettings


class ExperimentsSettings(ServiceSettings):
    """Each default written once, here; config/ab_testing.yaml (the product spec's name)
    overrides it, environment variables (the field name in upper case) override both."""

    yaml_name = "ab_testing"

    port: int = 50053
    metrics_port: int = 9153
    # Where an experiment leaves them unset.
    default_alpha: float = 0.05  # 95% confidence
    default_power: float = 0.8
    default_minimum_detectable_effect: float = 0.05  # relative, 5%
    # Results are "keep running" below this many units per variant, whatever the p-values.
    min_units_per_variant: int = 100
    # Sample-ratio mismatch is flagged below this chi-square p-value.
    srm_threshold: float = 0.001
    # Assign reuses an experiment definition read this recently (0: read it every time).
    # Start/stop/weight changes reach other replicas within this many seconds.
    definition_cache_seconds: float = 1.0
    # Mixing variance of the mSPRT's normal prior, in units of the metric's variance.
    sequential_tau: float = 1.0
    # The analytics service (host:port). Set: GetResults takes success, latency, time to
    # first token and rating from its per-variant request aggregates (metrics of other names
    # still come from RecordOutcomes). Empty: every metric comes from RecordOutcomes.
    analytics_addr: str = ""
    analytics_timeout_seconds: float = 10.0
    # Request-level metrics: multiply each variant's variance by the design-effect bound
    # sum(m^2)/sum(m) of its users' request counts (valid whatever the correlation between a
    # user's requests, conservative when it is weak). False: treat requests as independent.
    design_effect_bound: bool = True
    # The longest window the analytics service answers (its hour_retention_seconds).
    analytics_max_window_seconds: float = 30 * 24 * 3600
    # The adapter name analytics records for requests the base model served (a variant
    # without adapters): the inference model directory's name.
    base_model_name: str = "loraplex-tiny"
