from __future__ import annotations

from services.common.settings import ServiceSettings


class ExperimentsSettings(ServiceSettings):
    """Defaults in config/ab_testing.yaml (the product spec's name); env vars override."""

    yaml_name = "ab_testing"

    port: int = 50053
    metrics_port: int = 0
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
