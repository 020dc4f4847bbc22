"""What the tabs share: calling the gateway with errors shown as messages, per-tenant state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from console.client import ApiError, Gateway

T = TypeVar("T")

WINDOWS = ["15m", "1h", "6h", "24h", "7d"]


def attempt(action: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """The call's result, or None after showing the gateway's message and reason."""
    try:
        return action(*args, **kwargs)
    except ApiError as err:
        st.error(str(err), icon=":material/error:")
        return None


def state(api: Gateway) -> dict[str, Any]:
    """Session state of the tenant the session acts for: switching tenants (admin) never
    carries a lease or a selection over to another tenant."""
    return st.session_state.setdefault("per_tenant", {}).setdefault(api.tenant or "_own", {})


def adapter_names(api: Gateway, *, own_only: bool = False) -> list[str]:
    adapters = attempt(api.adapters) or []
    return [a["name"] for a in adapters if not (own_only and a.get("shared"))]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def seconds(value: float | None) -> str:
    if not value:
        return "-"
    return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.2f} s"
