from __future__ import annotations

from services.common.settings import ServiceSettings


class AnalyticsSettings(ServiceSettings):
    yaml_name = "analytics"

    port: int = 50052
    metrics_port: int = 9152
    minute_retention_seconds: int = 2 * 24 * 3600
    hour_retention_seconds: int = 30 * 24 * 3600
    batch_id_ttl_seconds: int = 24 * 3600
    max_batch_events: int = 10_000
    max_future_skew_seconds: int = 300
    minute_query_max_seconds: int = 3 * 3600
