"""`make run`'s stack: a crashed service is restarted while the others keep serving, the
keys never reach a log, and Ctrl-C stops every process cleanly."""

from __future__ import annotations

import os
import signal
import stat
import time

import httpx
import psutil
import pytest

from services.stack import grpc_serving, start_on_free_ports

pytestmark = pytest.mark.e2e


def child(stack, module: str) -> psutil.Process:
    children = psutil.Process(stack.process.pid).children()
    return next(p for p in children if f"services.{module}" in p.cmdline())


def completion(stack) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/completions",
        headers={"Authorization": f"Bearer {stack.keys['BANK_KEY']}"},
        json={"model": "bank-support", "prompt": "Customer: Hi\nAgent:", "max_tokens": 4},
        timeout=60,
    )


def test_a_killed_service_is_restarted_and_the_rest_stays_up(stack):
    analytics = child(stack, "analytics")
    address = analytics.environ()["ANALYTICS_ADDR"]
    analytics.send_signal(signal.SIGKILL)
    analytics.wait(timeout=10)
    # The stack and the gateway stay up; completions go on being served meanwhile.
    assert completion(stack).status_code == 200
    assert stack.process.poll() is None
    deadline = time.monotonic() + 90
    while not grpc_serving(address):
        assert time.monotonic() < deadline, "analytics was not restarted"
        time.sleep(0.5)
    restarted = child(stack, "analytics")
    assert restarted.pid != analytics.pid
    assert completion(stack).status_code == 200


def test_keys_are_in_a_private_file_and_never_in_the_log(stack):
    keys_file = stack.run_dir / "keys.env"
    log_file = stack.run_dir / "stack.log"
    for path in (keys_file, log_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    log = log_file.read_text()
    assert stack.admin_key in keys_file.read_text()
    for key in [stack.admin_key, *(v for k, v in stack.keys.items() if k.endswith("_KEY"))]:
        assert key not in log


def test_stack_stops_cleanly_on_ctrl_c(redis_url, tmp_path):
    """A stack of its own (the session's goes on serving the other tests)."""
    own = start_on_free_ports(tmp_path, redis_url, services=["inference"])
    children = psutil.Process(own.process.pid).children()
    assert len(children) == 3  # inference, the gateway and the console
    own.process.send_signal(signal.SIGINT)
    assert own.process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    for url in (f"{own.url}/healthz", f"{own.console_url}/_stcore/health"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
