"""The whole local stack (`python -m services.stack`, what `make run` starts) on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack import LocalStack, start_on_free_ports


@pytest.fixture(scope="session")
def lora_load_dir(tmp_path_factory) -> Path:
    """Where the stack's POST /v1/load_lora_adapter may read adapters from."""
    return tmp_path_factory.mktemp("lora-load")


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory, lora_load_dir: Path) -> Iterator[LocalStack]:
    try:
        running = start_on_free_ports(
            tmp_path_factory.mktemp("stack"),
            redis_url,
            env={"LORA_LOAD_DIR": str(lora_load_dir)},
        )
    except RuntimeError as err:
        pytest.fail(str(err))
    yield running
    running.stop()
