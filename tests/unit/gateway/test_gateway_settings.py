"""GatewaySettings: the shipped YAML, environment overrides, and the admin key's one name."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "HOST", "INFERENCE_ADDR", "LORAPLEX_ADMIN_KEY", "ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_shipped_yaml_holds_the_defaults() -> None:
    settings = GatewaySettings()
    assert settings.port == 8080
    assert settings.inference_addr == "127.0.0.1:50051"
    assert settings.request_timeout_seconds == 120
    assert settings.max_upload_bytes == 256 * 1024 * 1024
    assert settings.admin_key is None


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9090")
    monkeypatch.setenv("INFERENCE_ADDR", "inference:50051")
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY", "s3cret")
    settings = GatewaySettings()
    assert (settings.port, settings.inference_addr) == (9090, "inference:50051")
    assert settings.admin_key is not None
    assert settings.admin_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_admin_key_is_read_only_from_its_documented_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_KEY", "s3cret")
    assert GatewaySettings().admin_key is None
