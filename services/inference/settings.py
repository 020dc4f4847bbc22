from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from services.common.settings import REPO_ROOT, ServiceSettings


class InferenceSettings(ServiceSettings):
    yaml_name = "inference"
    extra_yaml_names = ("composition",)

    port: int = 50051
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
    # Upper bound on max_new_tokens a request may ask for (also bounded by the context).
    max_new_tokens_limit: int = 512
    # Sampling where a request leaves it unset. None: the model's generation_config.json
    # recommendation, else temperature 1 and top_p 1 (OpenAI's defaults).
    default_temperature: float | None = None
    default_top_p: float | None = None

    # Most adapters one composition may mix.
    max_composed_adapters: int = 8
    # Continuous batching (services/inference/scheduler.py).
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    max_prefill_tokens: int = 4096
    max_queued_requests: int = 256
    max_queued_per_tenant: int = 64

    @field_validator("model_dir", "adapter_store_dir")
    @classmethod
    def _relative_to_repo(cls, path: Path) -> Path:
        return path if path.is_absolute() else REPO_ROOT / path
