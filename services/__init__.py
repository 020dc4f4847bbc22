"""loraplex services, and the library API the product spec names.

    from services import AdapterAnalytics

Exports are imported lazily (PEP 562), so importing one service never pulls in another's
dependencies (the inference service's torch, say).
"""

from __future__ import annotations

import importlib
from typing import Any

# exported name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ABTestingFramework": "services.experiments.library",
    "get_ab_framework": "services.experiments.library",
    "ActiveLearningSelector": "services.activelearning.library",
    "UncertaintyMethod": "services.activelearning.library",
    "select_for_feedback": "services.activelearning.library",
    "AdapterAnalytics": "services.analytics.library",
    "get_analytics": "services.analytics.library",
    "RealtimeCompositor": "services.inference.library",
    "get_compositor": "services.inference.library",
    "LoRAFederation": "services.training.federation",
    "FederationConfig": "services.training.federation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'services' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
