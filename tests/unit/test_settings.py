from __future__ import annotations

from services.inference.settings import InferenceSettings


def test_yaml_defaults_are_overridden_by_environment(tmp_path, monkeypatch):
    (tmp_path / "inference.yaml").write_text("port: 6000\nadapter_cache_bytes: 1000\n")
    monkeypatch.setenv("LORAPLEX_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("ADAPTER_CACHE_BYTES", "2000")
    settings = InferenceSettings()
    assert settings.port == 6000  # from YAML
    assert settings.adapter_cache_bytes == 2000  # env wins over YAML


def test_shipped_config_parses():
    settings = InferenceSettings()
    assert settings.port == 50051
    assert settings.model_dir.is_dir()
