"""Analytics settings: each default written once, here; config/analytics.yaml overrides it,
environment variables (the field name in upper case) override both."""

from __future__ import annotations

from services.common.settings import ServiceSettings


class AnalyticsSettings(ServiceSettings):
    yaml_name = "analytics"

    port: int = 50052
    metrics_port: int = 9152
    # How long the 1-minute and the 1-hour buckets are kept (Redis keys expire after that).
    minute_retention_seconds: int = 2 * 24 * 3600
    hour_retention_seconds: int = 30 * 24 * 3600
    # How long a batch id is remembered, so a client retry within it is not counted again.
    batch_id_ttl_seconds: int = 24 * 3600
    # More events in one RecordBatch: INVALID_ARGUMENT.
    max_batch_events: int = 10_000
    # Events stamped further in the future than this are rejected (clock skew allowance).
    max_future_skew_seconds: int = 300
    # Queries over windows up to this long read minute buckets, longer ones hour buckets.
    minute_query_max_seconds: int = 3 * 3600
