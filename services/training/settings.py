from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from services.common.settings import REPO_ROOT, ServiceSettings


class TrainingSettings(ServiceSettings):
    """config/training.yaml says what each setting means."""

    yaml_name = "training"

    port: int = 50055
    metrics_port: int = 9155
    # The base model trained on: the same directory the inference service serves.
    model_dir: Path = REPO_ROOT / "models" / "loraplex-tiny"
    # Checkpoints and job files, one directory per job id (shared by every worker).
    training_dir: Path = REPO_ROOT / ".run" / "training"
    inference_addr: str = "127.0.0.1:50051"
    activelearning_addr: str | None = None
    experiments_addr: str | None = None

    # Workers: loops inside this process (0: only standalone `python -m
    # services.training.worker` processes train), jobs each runs at once, jobs per tenant.
    embedded_workers: int = 1
    worker_concurrency: int = 1
    max_running_per_tenant: int = 1
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    max_attempts: int = 3
    checkpoint_steps: int = 20
    # torch threads per worker process (0: torch's default).
    torch_threads: int = 0

    # Defaults of TrainingParams, and their bounds.
    default_rank: int = 8
    default_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    default_learning_rate: float = 2e-4
    default_epochs: int = 1
    default_batch_size: int = 8
    default_seed: int = 0
    default_heldout_fraction: float = 0.1
    default_max_length: int = 256
    default_dpo_beta: float = 0.1
    default_append_eos: bool = True
    max_rank: int = 256
    max_steps_limit: int = 100_000
    max_epochs: int = 100
    max_batch_size: int = 256

    # Data: biggest upload / export accepted, and the fewest examples a split may have.
    max_dataset_bytes: int = 32 * 1024 * 1024
    max_examples: int = 200_000
    min_train_examples: int = 2
    min_heldout_examples: int = 1

    watch_poll_seconds: float = 0.25
    # Job records, their data and candidate records expire after this long.
    retention_seconds: int = 90 * 24 * 3600
    # How often experiments of auto-promoting candidates are checked.
    auto_promote_interval_seconds: float = 60.0

    @field_validator("model_dir", "training_dir")
    @classmethod
    def _relative_to_repo(cls, path: Path) -> Path:
        return path if path.is_absolute() else REPO_ROOT / path
