"""Every metric a Grafana dashboard or an alert rule names is in the /metrics output of the
real stack (`python -m services.stack`, each service's metrics port from config/*.yaml as in
the containers) after some traffic: completions, an experiment, feedback, a swap, a rejected
analytics event."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from services.common.localhost import free_port, start_redis_server
from services.common.settings import REPO_ROOT
from services.stack import DEMO_TENANTS, GRPC_SERVICES, demo_adapter_name, read_keys
from tests.deploy.deployfiles import DEPLOY, settings_class

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# deploy/ is no package: load the generator from its file.
_spec = importlib.util.spec_from_file_location(
    "build_dashboards", DEPLOY / "grafana" / "build_dashboards.py"
)
build_dashboards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_dashboards)

METRIC = re.compile(r"\bloraplex_[a-z0-9_]+\b")
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself, not scraped from a target


def dashboard_queries() -> dict[str, str]:
    out = {}
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                out[f"{path.name}: {panel['title']}"] = target["expr"]
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                out[f"{path.name}: ${var['name']}"] = var["query"]["query"]
    return out


def alert_queries() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def test_dashboards_are_generated_from_build_dashboards() -> None:
    committed = {p.name: p.read_text() for p in (DEPLOY / "grafana/dashboards").glob("*.json")}
    assert committed == build_dashboards.render(), (
        "stale: run `python deploy/grafana/build_dashboards.py`"
    )


def test_alert_rules_are_complete() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_every_query_names_metrics() -> None:
    for where, expr in {**dashboard_queries(), **alert_queries()}.items():
        assert METRIC.search(expr) or "up{" in expr, where


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory) -> Iterator[dict]:
    """The stack with every service's /metrics on: config/*.yaml copied with free metrics
    ports (METRICS_PORT unset, so each service reads its own file, as in the image). Its own
    redis-server: the registry it fills must not name adapters in another stack's store."""
    run_dir = tmp_path_factory.mktemp("metrics-stack")
    redis_port = free_port()
    redis_server = start_redis_server(redis_port, str(run_dir))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    config = run_dir / "config"
    shutil.copytree(REPO_ROOT / "config", config)
    metrics_ports = {}
    for name in GRPC_SERVICES:
        yaml_file = config / f"{settings_class(f'services.{name}').yaml_name}.yaml"
        port = free_port()
        # The shipped YAML only overrides; this one sets the port (replacing any it sets).
        text = re.sub(r"(?m)^metrics_port:.*\n?", "", yaml_file.read_text())
        yaml_file.write_text(f"{text.rstrip()}\nmetrics_port: {port}\n")
        metrics_ports[name] = port
    admin_key = "lpx_admin_metrics_test"
    gateway_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "METRICS_PORT"}
    env |= {
        "REDIS_URL": redis_url,
        "LORAPLEX_RUN_DIR": str(run_dir),
        "LORAPLEX_CONFIG_DIR": str(config),
        "LORAPLEX_ADMIN_KEY": admin_key,
        "GATEWAY_PORT": str(gateway_port),
        "CONSOLE_PORT": str(free_port()),
        **{f"{name.upper()}_ADDR": f"127.0.0.1:{free_port()}" for name in GRPC_SERVICES},
    }
    log = (run_dir / "stack.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.stack"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 300
        while "AIRLINE_KEY" not in read_keys(run_dir / "keys.env"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "the stack did not start:\n" + (run_dir / "stack.log").read_text()[-5000:]
                )
            time.sleep(0.3)
        yield {
            "url": f"http://127.0.0.1:{gateway_port}",
            "keys": read_keys(run_dir / "keys.env"),
            "admin": admin_key,
            "addrs": {name: env[f"{name.upper()}_ADDR"] for name in GRPC_SERVICES},
            "metrics": {
                name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()
            },
        }
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        redis_server.terminate()
        redis_server.wait(timeout=10)


def until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.3)
    return value


def send_traffic(stack: dict) -> None:
    url = stack["url"]
    for tenant in DEMO_TENANTS:
        key = stack["keys"][f"{tenant.upper()}_KEY"]
        reply = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": demo_adapter_name(tenant),
                "prompt": "Where is my order?",
                "max_tokens": 4,
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
    bank = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {stack['keys']['BANK_KEY']}"}, timeout=120
    )
    definition = {
        "key": "metrics-ab",
        "variants": [
            {"name": "control", "traffic_weight": 0.5, "adapters": [{"name": "bank-support"}]},
            {"name": "treatment", "traffic_weight": 0.5, "adapters": []},
        ],
    }
    assert bank.post("/ab-testing/experiments", json=definition).status_code == 201
    started = bank.patch(
        "/ab-testing/experiments/metrics-ab", json={"action": "EXPERIMENT_ACTION_START"}
    )
    assert started.status_code == 200, started.text
    for user in ("u1", "u2", "u3"):
        body = {"model": "experiment:metrics-ab", "user": user, "prompt": "Hi", "max_tokens": 2}
        assert bank.post("/v1/completions", json=body).status_code == 200
    assert bank.get("/ab-testing/experiments/metrics-ab/results").status_code == 200

    # Feedback on one of the bank's completions (they are queued as candidates).
    def lease_one() -> dict | None:
        reply = bank.get("/feedback/next", params={"reviewer": "ops"}).json()
        return reply if reply.get("item") else None

    lease = until(lease_one)
    assert lease, "no completion reached the feedback queue"
    body = {
        "item_id": lease["item"]["id"],
        "reviewer": "ops",
        "lease_id": lease["lease_id"],
        "rating": 4,
    }
    assert bank.post("/feedback", json=body).status_code == 200
    # A swap to the version already served, and a rejected analytics event.
    swapped = bank.post("/composition/swap", json={"adapter": "bank-support", "version": 1})
    assert swapped.status_code == 200, swapped.text
    with grpc.insecure_channel(stack["addrs"]["analytics"]) as channel:
        event = apb.Event(tenant="bank")  # no adapter: rejected
        event.time.GetCurrentTime()
        apb_grpc.AnalyticsServiceStub(channel).RecordBatch(
            apb.RecordBatchRequest(batch_id="metrics-test", events=[event]), timeout=30
        )


def scraped_names(stack: dict) -> set[str]:
    names = set()
    # The gateway's /metrics wants the admin key or a metrics key; the services' ports are
    # internal and open.
    scraper = {"Authorization": f"Bearer {stack['admin']}"}
    for url in [f"{stack['url']}/metrics", *stack["metrics"].values()]:
        text = httpx.get(url, headers=scraper, timeout=30).text
        for family in text_string_to_metric_families(text):
            names |= {sample.name for sample in family.samples}
    return names


def test_every_dashboard_and_alert_metric_is_exported(metrics_stack: dict) -> None:
    send_traffic(metrics_stack)
    wanted = {
        where: set(METRIC.findall(expr))
        for where, expr in {**dashboard_queries(), **alert_queries()}.items()
    }
    every = set().union(*wanted.values())

    def missing() -> dict[str, set[str]]:
        names = scraped_names(metrics_stack) | PROMETHEUS_OWN
        return {w: m - names for w, m in wanted.items() if m - names}

    # Exporters flush on an interval: give them a few seconds.
    assert until(lambda: not missing(), timeout=30) or not missing(), missing()
    assert len(every) >= 25  # the dashboards cover the platform, not a corner of it


def test_compose_health_checks_pass_against_the_real_servers(metrics_stack: dict) -> None:
    """The command every compose health check runs, against the running services."""
    from tests.deploy.deployfiles import health_names

    def check(*args: str) -> int:
        command = [sys.executable, "-m", "services.common.healthcheck", *args]
        return subprocess.run(command, cwd=REPO_ROOT, timeout=30).returncode

    for name, addr in metrics_stack["addrs"].items():
        for service in health_names(f"services.{name}"):
            assert check("grpc", addr, service) == 0, (name, service)
        assert check("grpc", addr, "loraplex.nothing.v1.Nothing") == 1, name
    assert check("http", f"{metrics_stack['url']}/readyz") == 0
    assert check("http", f"{metrics_stack['url']}/no-such-page") == 1
    assert check("grpc", f"127.0.0.1:{free_port()}") == 1  # nobody listens
