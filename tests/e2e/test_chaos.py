"""Chaos: under steady load from the three demo tenants, kill -9 and restart in turn Redis
(with its append-only file), analytics, experiments, active learning and inference.
Afterwards analytics counts exactly the completions that were acknowledged (200), no
request hung, and every failure was a 503 with a reason.

The stack is `make run`'s (python -m services.stack, which restarts a killed service) on
a Redis of its own that the test kills and starts again on the same port and directory.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.analytics_exporter import EXPORTER_NAME
from services.stack import (
    DEMO_TENANTS,
    LocalStack,
    demo_adapter_name,
    grpc_serving,
    start_on_free_ports,
)
from tests.helpers import StoppableRedis

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Each request's bound: one not answered within it hung. Well above the gateway's own
# deadline (REQUEST_TIMEOUT_SECONDS below), so a slow backend shows as its 504, not here.
CLIENT_TIMEOUT = 30.0
RECOVERY_TIMEOUT = 120.0  # for a killed service to be back and serving every tenant


@pytest.fixture(scope="module")
def chaos(tmp_path_factory) -> Iterator[tuple[LocalStack, StoppableRedis]]:
    # everysec: Redis writes the file before it replies, so kill -9 of the process loses
    # nothing acknowledged (only a machine crash could lose the last second).
    redis = StoppableRedis(options=("--appendonly", "yes", "--appendfsync", "everysec"))
    redis.start()
    try:
        stack = start_on_free_ports(
            tmp_path_factory.mktemp("chaos"), redis.url, env={"REQUEST_TIMEOUT_SECONDS": "20"}
        )
    except RuntimeError as err:
        redis.stop()
        pytest.fail(str(err))
    yield stack, redis
    stack.stop()
    redis.stop()


@dataclass
class Load:
    """One client thread per tenant, one completion at a time, each bounded in time."""

    stack: LocalStack
    ok: Counter = field(default_factory=Counter)  # tenant -> 200s
    failures: Counter = field(default_factory=Counter)  # (status, reason) -> count
    hung: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, tenant: str) -> None:
        key = self.stack.keys[f"{tenant.upper()}_KEY"]
        body = {"model": demo_adapter_name(tenant), "prompt": "Customer: Hi\nAgent:"}
        with httpx.Client(
            base_url=self.stack.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=CLIENT_TIMEOUT,
        ) as client:
            while not self.stop.is_set():
                try:
                    reply = client.post("/v1/completions", json={**body, "max_tokens": 4})
                except httpx.TimeoutException:
                    with self.lock:
                        self.hung.append(tenant)
                    continue
                with self.lock:
                    if reply.status_code == 200:
                        self.ok[tenant] += 1
                    else:
                        self.failures[(reply.status_code, failure_reason(reply))] += 1
                if reply.status_code != 200:
                    time.sleep(0.05)  # as a client backing off; keeps the log readable

    def failed(self, reason: str) -> bool:
        with self.lock:
            return any(r == reason for _, r in self.failures)

    def served(self) -> Counter:
        with self.lock:
            return Counter(self.ok)


def failure_reason(reply: httpx.Response) -> str:
    """The reason of the gateway's error body ('' if it has none)."""
    try:
        details = reply.json()["error"]["details"]
    except (ValueError, KeyError, TypeError):
        return ""
    return next((d.get("reason", "") for d in details if "reason" in d), "")


def child(stack: LocalStack, name: str) -> psutil.Process:
    processes = psutil.Process(stack.process.pid).children()
    return next(p for p in processes if f"services.{name}" in p.cmdline())


def wait_for(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def every_tenant_served_again(load: Load) -> None:
    """Each tenant gets completions again: the stack has recovered."""
    before = load.served()
    wait_for(
        lambda: all(load.served()[t] >= before[t] + 3 for t in DEMO_TENANTS),
        "every tenant to be served again",
        RECOVERY_TIMEOUT,
    )


def counted(stack: LocalStack, tenant: str) -> int:
    """Successful completions analytics counted for the tenant's demo adapter."""
    reply = httpx.get(
        f"{stack.url}/analytics/adapters/{demo_adapter_name(tenant)}",
        params={"window": "1h"},
        headers={"Authorization": f"Bearer {stack.keys[f'{tenant.upper()}_KEY']}"},
        timeout=CLIENT_TIMEOUT,
    )
    if reply.status_code != 200:
        return -1
    return int(reply.json().get("metrics", {}).get("successes", 0))


@pytest.mark.timeout(480)  # ~1.5 min on a quiet 2-core machine; each wait is bounded
def test_killing_each_part_in_turn_loses_no_count_and_fails_only_with_503s(chaos):
    stack, redis = chaos
    load = Load(stack)
    threads = [threading.Thread(target=load.run, args=(t,), daemon=True) for t in DEMO_TENANTS]
    for thread in threads:
        thread.start()
    try:
        every_tenant_served_again(load)

        redis.stop(signal.SIGKILL)
        wait_for(lambda: load.failed("REDIS_UNAVAILABLE"), "a request meanwhile", 60)
        redis.start()  # same port and directory: the append-only file is loaded
        every_tenant_served_again(load)

        # Analytics stays down longer than the gateway's retry budget for a batch (which
        # is where the in-memory exporter dropped events): killed again each time the
        # supervisor restarts it, until the gateway reports a batch whose retries ran out.
        before = exhausted_batches(stack)
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while exhausted_batches(stack) == before:
            assert time.monotonic() < deadline, "the gateway never ran out of retries"
            kill(stack, "analytics")
            time.sleep(0.2)
        for name in ("analytics", "experiments", "activelearning", "inference"):
            if name != "analytics":
                kill(stack, name)
            # The stack's supervisor starts it again.
            wait_for(lambda n=name: grpc_serving(stack_addr(stack, n)), name, RECOVERY_TIMEOUT)
            every_tenant_served_again(load)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT + 5)

    assert load.hung == [], "requests not answered within the client's timeout"
    assert all(not t.is_alive() for t in threads)
    not_503 = {k: n for k, n in load.failures.items() if k[0] != 503 or not k[1]}
    assert not_503 == {}, f"failures other than a 503 with a reason: {dict(load.failures)}"
    served = load.served()
    # The outbox delivers what analytics missed while it (or Redis) was down.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(counted(stack, t) >= served[t] for t in DEMO_TENANTS):
            break
        time.sleep(0.5)
    assert {t: counted(stack, t) for t in DEMO_TENANTS} == dict(served)
    print(f"served {dict(served)}; failures {dict(load.failures)}")


def test_the_stack_still_stops_cleanly_on_ctrl_c(chaos):
    """After the chaos (or alone): Ctrl-C stops every process with status 0. On this
    module's stack, so that no other test finds the session's stack stopped."""
    stack, _ = chaos
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.url}/healthz", timeout=2)


def kill(stack: LocalStack, name: str) -> None:
    """kill -9 the service, if it is running (the supervisor may be restarting it)."""
    try:
        process = child(stack, name)
    except StopIteration:
        return
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def stack_addr(stack: LocalStack, name: str) -> str:
    return psutil.Process(stack.process.pid).environ()[f"{name.upper()}_ADDR"]


def exhausted_batches(stack: LocalStack) -> float:
    """The gateway's count of analytics batches whose send retries ran out."""
    scraper = {"Authorization": f"Bearer {stack.admin_key}"}
    text = httpx.get(f"{stack.url}/metrics", headers=scraper, timeout=CLIENT_TIMEOUT).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraplex_batch_export_exhausted_total" and (
                sample.labels.get("exporter") == EXPORTER_NAME
            ):
                return sample.value
    return 0.0
