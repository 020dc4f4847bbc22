from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from services.common.settings import REPO_ROOT, ServiceSettings


class InferenceSettings(ServiceSettings):
    yaml_name = "inference"

    port: int = 50051
    # A local Hugging Face causal-LM directory; the default is the project's own small model.
    model_dir: Path = REPO_ROOT / "models" / "loraplex-tiny"
    # Where registered adapters' files live (one directory per tenant/name/sha256).
    adapter_store_dir: Path = REPO_ROOT / ".run" / "adapter-store"
    # "auto" picks CUDA when present, else CPU.
    device: str = "auto"
    # "auto": float32 on CPU, bfloat16 on CUDA.
    dtype: str = "auto"
    # Byte budget of loaded adapters (their weights as held on the device).
    adapter_cache_bytes: int = 256 * 1024 * 1024
    # Upper bound on max_new_tokens a request may ask for (also bounded by the context).
    max_new_tokens_limit: int = 512
    # Sampling where a request leaves it unset. None: the model's generation_config.json
    # recommendation, else temperature 1 and top_p 1 (OpenAI's defaults).
    default_temperature: float | None = None
    default_top_p: float | None = None

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
