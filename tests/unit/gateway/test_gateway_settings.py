"""GatewaySettings: the shipped YAML, environment overrides, and the admin key's one name."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("PORT", "HOST", "INFERENCE_ADDR", "LORAPLEX_ADMIN_KEY", "ADMIN_KEY")
    for name in (*names, "GATEWAY_INSTANCE"):
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


def test_the_outbox_instance_name_is_stable_and_safe_in_batch_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Default: the same for every run on this host and port, so a restart finds its outbox.
    assert GatewaySettings(port=8081).instance == GatewaySettings(port=8081).instance
    assert GatewaySettings(port=8081).instance.endswith("-8081")
    monkeypatch.setenv("GATEWAY_INSTANCE", "gw-1")
    assert GatewaySettings().instance == "gw-1"
    with pytest.raises(ValueError):
        GatewaySettings(gateway_instance="gw 1/{x}")  # batch ids allow [A-Za-z0-9._:-]
