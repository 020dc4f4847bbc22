"""`make run` with INFERENCE_REPLICAS=2: two inference processes behind one gateway, which
routes across both, and keeps serving when one is killed."""

from __future__ import annotations

import signal

import httpx
import psutil
import pytest

from services.stack import start_on_free_ports

pytestmark = pytest.mark.e2e


def completion(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "bank-support", "prompt": "Customer: Hi\nAgent:", "max_tokens": 4},
        timeout=60,
    )


def test_two_replicas_serve_and_one_may_die(redis_url: str, tmp_path) -> None:
    try:
        stack = start_on_free_ports(
            tmp_path, redis_url, env={"INFERENCE_REPLICAS": "2"}, services=("inference",)
        )
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        admin = {"Authorization": f"Bearer {stack.admin_key}"}
        cache = httpx.get(f"{stack.url}/admin/cache", headers=admin, timeout=30).json()
        addresses = sorted(r["address"] for r in cache["replicas"])
        assert len(addresses) == 2 and stack.addrs["inference"] in addresses
        assert completion(stack.url, stack.keys["BANK_KEY"]).status_code == 200

        # Kill the replica that holds bank-support: its next requests go to the other.
        children = psutil.Process(stack.process.pid).children()
        inference = [p for p in children if "services.inference" in p.cmdline()]
        assert len(inference) == 2
        before = httpx.get(f"{stack.url}/admin/cache", headers=admin, timeout=30).json()
        holder = next(
            r["address"]
            for r in before["replicas"]
            if any(a["name"] == "bank-support" for a in r.get("adapters", []))
        )
        victim = next(p for p in inference if p.environ()["PORT"] == holder.rsplit(":", 1)[1])
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        for _ in range(3):  # retried on the other replica, then routed there directly
            assert completion(stack.url, stack.keys["BANK_KEY"]).status_code == 200
    finally:
        assert stack.stop() == 0
