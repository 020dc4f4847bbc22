"""The whole local stack (`python -m services.stack`, what `make run` starts) on free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.stack import LocalStack, start_on_free_ports


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory) -> Iterator[LocalStack]:
    try:
        running = start_on_free_ports(tmp_path_factory.mktemp("stack"), redis_url)
    except RuntimeError as err:
        pytest.fail(str(err))
    yield running
    running.stop()
