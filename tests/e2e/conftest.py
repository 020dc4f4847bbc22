"""The whole local stack (`python -m services.stack`, what `make run` starts) on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.localhost import free_port
from services.common.settings import REPO_ROOT

GRPC_SERVICE_ENV = ("INFERENCE", "ANALYTICS", "EXPERIMENTS")


@dataclass
class Stack:
    url: str
    keys: dict[str, str]
    process: subprocess.Popen
    run_dir: Path


def parse_keys(path: Path) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines())
    return dict(pairs)


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack")
    gateway_port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "LORAPLEX_RUN_DIR": str(run_dir),
        **{f"{svc}_ADDR": f"127.0.0.1:{free_port()}" for svc in GRPC_SERVICE_ENV},
        "GATEWAY_PORT": str(gateway_port),
        "METRICS_PORT": "0",
        "LORAPLEX_ADMIN_KEY": "lpx_admin_e2e_" + os.urandom(8).hex(),
    }
    log = (run_dir / "stack.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.stack"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
    )
    keys_file = run_dir / "keys.env"
    deadline = time.monotonic() + 300
    while not keys_file.exists() or "AIRLINE_KEY" not in keys_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("stack did not start:\n" + (run_dir / "stack.log").read_text()[-5000:])
        time.sleep(0.3)
    yield Stack(f"http://127.0.0.1:{gateway_port}", parse_keys(keys_file), proc, run_dir)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
