from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from pydantic import Field, field_validator

from services.common.settings import REPO_ROOT, ServiceSettings


@dataclass(frozen=True)
class BatchingLimits:
    """Continuous batching (services/inference/scheduler.py). The settings below take their
    defaults from here, and YAML or the environment override them."""

    max_batch_size: int = 32  # rows decoded together
    batch_wait_ms: float = 2.0  # how long an idle model waits for more requests to batch
    # Prompt tokens prefilled per step at most, so running rows keep a steady pace.
    max_prefill_tokens: int = 4096
    max_queued_requests: int = 256  # beyond this, RESOURCE_EXHAUSTED at once
    max_queued_per_tenant: int = 64  # so one tenant's flood cannot fill the whole queue


class InferenceSettings(ServiceSettings):
    yaml_name = "inference"
    extra_yaml_names = ("composition",)

    port: int = 50051
    metrics_port: int = 9151  # Prometheus /metrics (0 turns it off)
    # A local Hugging Face causal-LM directory; the default is the project's own small model.
    model_dir: Path = REPO_ROOT / "models" / "loraplex-tiny"
    # Where registered adapters' files live (one directory per tenant/name/sha256).
    adapter_store_dir: Path = REPO_ROOT / ".run" / "adapter-store"
    # "auto" picks CUDA when present, else CPU.
    device: str = "auto"
    # "auto": float32 on CPU, bfloat16 on CUDA.
    dtype: str = "auto"
    # Byte budgets of loaded adapters in host memory, and in GPU memory when the model runs
    # on a GPU (config/composition.yaml).
    adapter_cache_bytes: int = 256 * 1024 * 1024
    device_cache_bytes: int = 256 * 1024 * 1024
    # Adapters unused for this long leave the cache (None: only LRU eviction).
    adapter_cache_ttl_seconds: float | None = None
    # The most of each cache tier one tenant's adapters may hold (1: no limit). Past it the
    # tenant's own least recently used adapters go, never another tenant's.
    adapter_cache_tenant_share: float = Field(default=0.5, gt=0, le=1)
    # Upper bound on max_new_tokens a request may ask for (also bounded by the context).
    max_new_tokens_limit: int = 512
    # Sampling where a request leaves it unset. None: the model's generation_config.json
    # recommendation, else temperature 1 and top_p 1 (OpenAI's defaults).
    default_temperature: float | None = None
    default_top_p: float | None = None

    # Most adapters one composition may mix.
    max_composed_adapters: int = 8
    # Continuous batching: BatchingLimits says what each means.
    max_batch_size: int = BatchingLimits.max_batch_size
    batch_wait_ms: float = BatchingLimits.batch_wait_ms
    max_prefill_tokens: int = BatchingLimits.max_prefill_tokens
    max_queued_requests: int = BatchingLimits.max_queued_requests
    max_queued_per_tenant: int = BatchingLimits.max_queued_per_tenant

    def batching_limits(self) -> BatchingLimits:
        return BatchingLimits(**{f.name: getattr(self, f.name) for f in fields(BatchingLimits)})

    @field_validator("model_dir", "adapter_store_dir")
    @classmethod
    def _relative_to_repo(cls, path: Path) -> Path:
        return path if path.is_absolute() else REPO_ROOT / path
