"""Gateway settings: config/gateway.yaml, overridden by environment variables."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr

from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    yaml_name: ClassVar[str] = "gateway"

    port: int = 8080
    # host:port of the inference service's gRPC server (env INFERENCE_ADDR).
    inference_addr: str = "127.0.0.1:50051"
    # host:port of the analytics service (env ANALYTICS_ADDR). Unset: no usage events are
    # exported and /analytics answers 503.
    analytics_addr: str | None = None
    # host:port of the experiments service (env EXPERIMENTS_ADDR). Unset: /ab-testing and
    # `model: "experiment:<key>"` answer 503.
    experiments_addr: str | None = None
    # host:port of the active-learning service (env ACTIVELEARNING_ADDR). Unset: completions
    # are not submitted as candidates and /active-learning, /feedback answer 503.
    activelearning_addr: str | None = None
    # host:port of the training service (env TRAINING_ADDR). Unset: /training answers 503.
    training_addr: str | None = None
    # The key that unlocks /admin (env LORAPLEX_ADMIN_KEY only: the project-wide name, and
    # no ADMIN_KEY alias to collide with). Unset: the admin API refuses every request.
    admin_key: SecretStr | None = Field(default=None, validation_alias="loraplex_admin_key")
    # Deadline of every gRPC call made on behalf of an HTTP request.
    request_timeout_seconds: float = Field(default=120.0, gt=0)
    # Deadline of the dependency checks behind /readyz (kept short: probes time out fast).
    health_timeout_seconds: float = Field(default=2.0, gt=0)
    # How many (tenant, adapter) pairs get Prometheus series of their own; the rest share
    # one "_other" series (bounded cardinality).
    adapter_metrics_limit: int = Field(default=200, ge=0)
    # Largest request body accepted; adapter uploads under /admin get the larger limit.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
