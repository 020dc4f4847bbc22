from __future__ import annotations

import pytest
import yaml

from gateway.settings import GatewaySettings
from services.activelearning.settings import ActiveLearningSettings
from services.analytics.settings import AnalyticsSettings
from services.common.settings import REPO_ROOT
from services.experiments.settings import ExperimentsSettings
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


@pytest.mark.parametrize(
    "settings_class",
    [
        InferenceSettings,
        AnalyticsSettings,
        ExperimentsSettings,
        ActiveLearningSettings,
        GatewaySettings,
    ],
)
def test_shipped_yaml_restates_no_default(settings_class):
    """Each default is written once, in the settings class; the YAML only overrides."""
    fields = settings_class.model_fields
    for name in (settings_class.yaml_name, *getattr(settings_class, "extra_yaml_names", ())):
        path = REPO_ROOT / "config" / f"{name}.yaml"
        shipped = yaml.safe_load(path.read_text()) or {}
        restated = {k for k, v in shipped.items() if k in fields and fields[k].default == v}
        assert not restated, f"{path.name} restates the defaults of {sorted(restated)}"
