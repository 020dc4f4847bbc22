"""Gateway settings: each default written once, here; config/gateway.yaml overrides it,
environment variables (the field name in upper case) override both."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator

from gateway.limits import TenantLimits
from gateway.replicas import ReplicaSource, parse_replicas
from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    yaml_name: ClassVar[str] = "gateway"

    port: int = 8080
    # host:port of the inference service's gRPC server (env INFERENCE_ADDR).
    inference_addr: str = "127.0.0.1:50051"
    # Several inference replicas (env INFERENCE_ADDRESSES), instead of inference_addr:
    # "host:port,host:port,..." or "dns:///<name>:<port>" for every address the name
    # resolves to (a Kubernetes headless Service), looked up again every
    # inference_dns_refresh_seconds. Duplicates or bad addresses stop the gateway at start.
    inference_addresses: str | None = None
    inference_dns_refresh_seconds: float = Field(default=10.0, gt=0)
    # affinity: an adapter's requests go to the replica that has it cached (rendezvous
    # hashing with bounded load); round_robin: each request to the next replica.
    inference_routing: Literal["affinity", "round_robin"] = "affinity"
    # The ε of bounded load: a replica already serving ceil((1 + ε) * the mean in-flight
    # requests) is passed over, so a hot adapter spills to its next replica.
    routing_load_factor: float = Field(default=0.25, ge=0)
    # A replica with fewer requests than this in flight is never passed over, whatever the
    # bound: where a batch of n costs little more than one (a GPU), spilling would only
    # load the adapter twice. 0: the bound alone (on CPU, balance pays more than hits).
    routing_load_floor: int = Field(default=0, ge=0)
    # A replica that fails with UNAVAILABLE (unreachable, shutting down) gets no requests
    # for this long, unless its health check, polled every replica_probe_seconds, says
    # SERVING sooner.
    replica_down_seconds: float = Field(default=5.0, gt=0)
    replica_probe_seconds: float = Field(default=1.0, gt=0)
    # host:port of the analytics service (env ANALYTICS_ADDR). Unset: no usage events are
    # exported and /analytics answers 503.
    analytics_addr: str | None = None
    # Names this gateway's analytics outbox (a Redis stream; docs/analytics.md): unique
    # among the gateways that share a Redis, and kept across restarts, so a restarted
    # gateway sends what its previous run left. Unset: <hostname>-<port>.
    gateway_instance: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # Bound of the outbox (about 100 bytes of Redis memory an event): while analytics is
    # down longer than it takes to fill, newer events are dropped and counted.
    analytics_outbox_max_events: int = Field(default=1_000_000, ge=1)
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
    # A key for the Prometheus scrape of /metrics and nothing else (env LORAPLEX_METRICS_KEY),
    # for deployments whose Prometheus is configured before any key can be issued through
    # the API; metrics keys issued by POST /admin/metrics-keys work as well.
    metrics_key: SecretStr | None = Field(default=None, validation_alias="loraplex_metrics_key")
    # Deadline of every gRPC call made on behalf of an HTTP request.
    request_timeout_seconds: float = Field(default=120.0, gt=0)
    # Deadline of the Redis and inference checks behind /readyz (kept short: probes time
    # out fast).
    health_timeout_seconds: float = Field(default=2.0, gt=0)
    # How many (tenant, adapter) pairs get Prometheus series of their own; the rest share
    # one "_other" series (bounded cardinality).
    adapter_metrics_limit: int = Field(default=200, ge=0)
    # Each tenant's limits where the admin set none of its own (PUT /admin/tenants/{t}/limits);
    # TenantLimits says what each means, 0 is unlimited. YAML: a mapping; environment:
    # TENANT_LIMITS='{"tokens_per_minute": 60000}'.
    tenant_limits: TenantLimits = TenantLimits()
    # Largest request body accepted; adapter uploads under /admin get the larger limit.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # A request body must arrive at this pace (seconds per chunk) or get 408: half-sent
    # requests cannot hold connections open.
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)
    # The directory POST /v1/load_lora_adapter (vLLM's route) may read adapters from, on
    # the gateway's file system (env LORA_LOAD_DIR); its `lora_path` must resolve inside it.
    # Unset: that route refuses every request.
    lora_load_dir: Path | None = None
    # Idle keep-alive connections close after this many seconds (uvicorn's default is 5).
    keep_alive_timeout_seconds: float = Field(default=5.0, gt=0)

    @field_validator("inference_addresses")
    @classmethod
    def _valid_replicas(cls, value: str | None) -> str | None:
        if value is not None:
            parse_replicas(value)  # refuses duplicates and bad addresses with the reason
        return value

    @property
    def replica_source(self) -> ReplicaSource:
        if self.inference_addresses is None:
            return ReplicaSource(addresses=(self.inference_addr,))
        return parse_replicas(self.inference_addresses)

    @property
    def instance(self) -> str:
        if self.gateway_instance:
            return self.gateway_instance
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:50]
        return f"{host}-{self.port}"
