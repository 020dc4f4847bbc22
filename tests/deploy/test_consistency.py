"""The deploy files agree with the code: every command is an entry point, every variable is
read by that process's settings class, every port, probe and address matches what the
settings (class defaults, config/*.yaml, the env given) make it serve. Nothing here is a
copied constant: the truth comes from services/*/settings.py, gateway/settings.py,
config/*.yaml, the servicers' health names and the gateway's routes."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from services.common.settings import REPO_ROOT
from tests.deploy.deployfiles import (
    COMPOSE_FILES,
    DEPLOY,
    OVERLAYS,
    by_kind,
    compose_config,
    container_env_k8s,
    entry_points,
    gateway_paths,
    grpc_entry_points,
    health_names,
    image_entrypoint,
    image_env,
    overlay,
    resolved_settings,
    split_addr,
)

GRPC_HEALTHCHECK = ["CMD", "python", "-m", "services.common.healthcheck", "grpc"]
HTTP_HEALTHCHECK = ["CMD", "python", "-m", "services.common.healthcheck", "http"]


def service_name(module: str) -> str:
    """The compose service, Deployment and Service name of an entry point."""
    return module.removeprefix("services.")


def test_entry_points_are_what_the_image_runs() -> None:
    assert image_entrypoint() == ["python", "-m"]
    for module in entry_points():
        main = REPO_ROOT / Path(*module.split(".")) / "__main__.py"
        assert main.exists(), module


def test_healthcheck_module_is_in_the_image() -> None:
    assert (REPO_ROOT / "services" / "common" / "healthcheck.py").exists()
    assert "COPY services/" in (DEPLOY / "Dockerfile").read_text()


# --- docker-compose ------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts, text
    return sum(float(n) * units[u] for n, u in parts)


def compose_settings(variant: str) -> dict[str, object]:
    services = compose_config(variant)["services"]
    return {
        m: resolved_settings(m, {**image_env(), **services[service_name(m)]["environment"]})
        for m in entry_points()
    }


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_compose_matches_the_code(variant: str) -> None:
    services = compose_config(variant)["services"]
    settings = compose_settings(variant)
    for module, s in settings.items():
        name = service_name(module)
        service = services[name]
        assert service["command"] == [module], name
        assert service.get("entrypoint") is None, name  # the image's python -m
        assert s.host == "0.0.0.0", f"{name} would listen on {s.host} only"
        grace = parse_duration(service["stop_grace_period"])
        assert grace > s.shutdown_grace_seconds, name
        test = service["healthcheck"]["test"]
        if module == "gateway":
            assert test[:5] == HTTP_HEALTHCHECK, name
            url = test[5]
            assert url == f"http://127.0.0.1:{s.port}/readyz"
            assert "/readyz" in gateway_paths()
            published = [p["target"] for p in service["ports"]]
            assert published == [s.port]
        else:
            assert test[:5] == GRPC_HEALTHCHECK, name
            assert split_addr(test[5]) == ("127.0.0.1", s.port), name
            assert test[6] in health_names(module), name
            assert s.metrics_port, f"{name}: /metrics is off"
        assert s.redis_url, f"{name} would start its own embedded Redis"
        check_addresses(name, s, lambda host: compose_target(host, services, settings))


def compose_target(host: str, services: dict, settings: dict) -> int:
    """The port a compose service listens on: its settings for loraplex, redis' default."""
    assert host in services, f"{host} is not a compose service"
    if host == "redis":
        return 6379
    return settings[next(m for m in settings if service_name(m) == host)].port


def check_addresses(name: str, s, port_of) -> None:
    """Every *_ADDR and REDIS_URL a process is given points at a port that is served."""
    for field, value in s.model_dump().items():
        if field.endswith("_addr") and value:
            host, port = split_addr(value)
            assert port == port_of(host), f"{name}.{field}={value}"
    if s.redis_url and not s.redis_url.startswith("<from"):
        match = re.fullmatch(r"rediss?://([^:/]+):(\d+)/\d+", s.redis_url)
        assert match, s.redis_url
        assert int(match[2]) == port_of(match[1]), f"{name}.redis_url={s.redis_url}"


def test_gateway_reaches_every_grpc_service_in_compose() -> None:
    env = compose_config("cpu")["services"]["gateway"]["environment"]
    for module in grpc_entry_points():
        assert f"{service_name(module).upper()}_ADDR" in env, module


def test_prometheus_scrapes_every_metrics_endpoint() -> None:
    settings = compose_settings("cpu")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        (job.get("metrics_path", "/metrics"), t)
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for t in group["targets"]
    }
    expected = {("/metrics", f"gateway:{settings['gateway'].port}")}
    expected |= {
        ("/metrics", f"{service_name(m)}:{settings[m].metrics_port}") for m in grpc_entry_points()
    }
    assert expected <= targets
    assert "/metrics" in gateway_paths()
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


# --- Kubernetes ------------------------------------------------------------------------------


def k8s_settings(docs: list[dict]) -> dict[str, tuple[dict, object]]:
    deployments = by_kind(docs, "Deployment")
    out = {}
    for module in entry_points():
        deployment = deployments[service_name(module)]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {**image_env(), **container_env_k8s(container, docs)}
        out[module] = (deployment, resolved_settings(module, env))
    return out


def named_port(ports: list[dict], name: str, key: str = "containerPort") -> int:
    found = [p[key] for p in ports if p.get("name") == name]
    assert len(found) == 1, f"no single port named {name}: {ports}"
    return found[0]


@pytest.mark.parametrize("name", OVERLAYS)
def test_manifests_match_the_code(name: str) -> None:
    docs = overlay(name)
    services = by_kind(docs, "Service")
    settings = k8s_settings(docs)
    for module, (deployment, s) in settings.items():
        sname = service_name(module)
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["args"] == [module] and "command" not in c, sname
        assert s.host == "0.0.0.0", sname
        assert pod["terminationGracePeriodSeconds"] > s.shutdown_grace_seconds, sname
        service = services[sname]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            pod.get("labels", deployment["spec"]["template"]["metadata"]["labels"]).items()
        )
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        config_volume = next(v for v in pod["volumes"] if v["name"] == mounts["/etc/loraplex"])
        assert config_volume["configMap"]["name"].startswith("loraplex-config")
        if module == "gateway":
            port = named_port(c["ports"], "http")
            assert port == s.port
            assert named_port(service["spec"]["ports"], "http", "port") == s.port
            for probe in (c["readinessProbe"], c["livenessProbe"]):
                assert probe["httpGet"]["port"] in ("http", s.port)
                assert probe["httpGet"]["path"] in gateway_paths()
            continue
        # gRPC: the port named grpc (the style microservices-demo uses), native grpc probes.
        assert named_port(c["ports"], "grpc") == s.port, sname
        assert named_port(c["ports"], "metrics") == s.metrics_port != 0, sname
        assert named_port(service["spec"]["ports"], "grpc", "port") == s.port, sname
        assert named_port(service["spec"]["ports"], "metrics", "port") == s.metrics_port, sname
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            if kind in c:
                assert c[kind]["grpc"]["port"] == s.port, f"{sname} {kind}"
                assert c[kind]["grpc"].get("service", "") in health_names(module), sname

    def port_of(host: str) -> int:
        assert host in services, f"{host} is not a Service"
        ports = services[host]["spec"]["ports"]
        grpc_or_redis = [p["port"] for p in ports if p["name"] in ("grpc", "redis")]
        assert len(grpc_or_redis) == 1, host
        return grpc_or_redis[0]

    for module, (_, s) in settings.items():
        check_addresses(service_name(module), s, port_of)


def test_gateway_reaches_every_grpc_service_in_k8s() -> None:
    _, gateway = k8s_settings(overlay("dev"))["gateway"]
    for module in grpc_entry_points():
        assert getattr(gateway, f"{service_name(module)}_addr"), module


def test_redis_service_matches_the_statefulset() -> None:
    docs = overlay("dev")
    redis = by_kind(docs, "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]
    assert named_port(redis["ports"], "redis") == 6379
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    mounts = {m["mountPath"] for m in redis["volumeMounts"]}
    assert "/data" in mounts


def test_network_policies_let_every_caller_in() -> None:
    """Each *_ADDR / REDIS_URL a Deployment is given is allowed by a NetworkPolicy of the
    callee, from the caller, on that port; and nothing else reaches the gRPC services."""
    docs = overlay("production")
    policies = by_kind(docs, "NetworkPolicy").values()
    settings = k8s_settings(docs)

    def allowed(caller: str, callee: str, port: int) -> bool:
        for p in policies:
            if p["spec"]["podSelector"].get("matchLabels", {}).get("app") != callee:
                continue
            for rule in p["spec"]["ingress"]:
                froms = rule.get("from")
                who = froms is None or any(
                    f.get("podSelector", {}).get("matchLabels", {}).get("app") == caller
                    for f in froms
                )
                if who and any(x["port"] == port for x in rule["ports"]):
                    return True
        return False

    calls = set()
    for module, (_, s) in settings.items():
        caller = service_name(module)
        for field, value in s.model_dump().items():
            if field.endswith("_addr") and value:
                host, port = split_addr(value)
                calls.add((caller, host, port))
        calls.add((caller, "redis", 6379))
    for caller, callee, port in calls:
        assert allowed(caller, callee, port), f"{caller} -> {callee}:{port} is blocked"
    # The converse: a gRPC port admits only the pods that were given its address.
    for module in grpc_entry_points():
        callee = service_name(module)
        port = settings[module][1].port
        admitted = {
            f["podSelector"]["matchLabels"]["app"]
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels", {}).get("app") == callee
            for rule in p["spec"]["ingress"]
            if any(x["port"] == port for x in rule["ports"])
            for f in rule.get("from", [{"podSelector": {"matchLabels": {"app": "*"}}}])
            if "podSelector" in f
        }
        assert admitted == {c for c, h, p in calls if h == callee and p == port}, callee


def test_service_monitors_scrape_every_metrics_port() -> None:
    docs = overlay("production")
    services = by_kind(docs, "Service")
    monitors = by_kind(docs, "ServiceMonitor").values()
    scraped = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]
        for sname, service in services.items():
            labels = service["metadata"]["labels"]
            match = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
            for expr in selector.get("matchExpressions", []):
                assert expr["operator"] == "In"
                match = match and labels.get(expr["key"]) in expr["values"]
            if not match:
                continue
            names = {p["name"] for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                if endpoint["port"] in names:
                    scraped.add((sname, endpoint["port"], endpoint.get("path", "/metrics")))
    expected = {(service_name(m), "metrics", "/metrics") for m in grpc_entry_points()}
    expected.add(("gateway", "http", "/metrics"))
    assert expected <= scraped


def test_grace_periods_are_durations() -> None:
    # compose's stop_grace_period and k8s' terminationGracePeriodSeconds say the same.
    compose = parse_duration(compose_config("cpu")["services"]["inference"]["stop_grace_period"])
    k8s = by_kind(overlay("dev"), "Deployment")["inference"]["spec"]["template"]["spec"]
    assert timedelta(seconds=compose) == timedelta(seconds=k8s["terminationGracePeriodSeconds"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_gateway_finds_every_inference_pod_through_a_headless_service(name: str) -> None:
    docs = overlay(name)
    source = k8s_settings(docs)["gateway"][1].replica_source
    service = by_kind(docs, "Service")[source.dns_name]
    inference = by_kind(docs, "Deployment")["inference"]
    assert service["spec"]["clusterIP"] == "None"  # one DNS record per pod, not one VIP
    assert service["spec"]["selector"] == inference["spec"]["selector"]["matchLabels"]
    (container,) = inference["spec"]["template"]["spec"]["containers"]
    target = named_port(service["spec"]["ports"], "grpc", "targetPort")
    assert named_port(container["ports"], "grpc") == source.dns_port
    assert named_port(service["spec"]["ports"], "grpc", "port") == source.dns_port
    assert target in ("grpc", source.dns_port)


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_the_compose_gateway_finds_every_inference_container(variant: str) -> None:
    settings = compose_settings(variant)
    source = settings["gateway"].replica_source
    assert source.dns_name == "inference"  # Docker's DNS lists every scaled container
    assert source.dns_port == settings["services.inference"].port
