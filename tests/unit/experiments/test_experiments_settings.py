from __future__ import annotations

from services.experiments.settings import ExperimentsSettings


def test_shipped_config_is_ab_testing_yaml():
    settings = ExperimentsSettings()
    assert settings.port == 50053 and settings.metrics_port == 9153
    assert settings.default_alpha == 0.05 and settings.default_power == 0.8
    assert settings.min_units_per_variant == 100 and settings.srm_threshold == 0.001


def test_environment_overrides_yaml(tmp_path, monkeypatch):
    (tmp_path / "ab_testing.yaml").write_text("port: 6100\ndefault_alpha: 0.1\n")
    monkeypatch.setenv("LORAPLEX_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("DEFAULT_ALPHA", "0.01")
    settings = ExperimentsSettings()
    assert settings.port == 6100  # from YAML
    assert settings.default_alpha == 0.01  # env wins
