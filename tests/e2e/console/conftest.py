"""The console against the real stack (the e2e `stack` fixture): a tenant of its own with an
adapter in two versions, traffic on it, and its outputs in the feedback queue."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from console.client import Gateway
from services.common.settings import REPO_ROOT
from tests.helpers import DEMO_ADAPTERS, adapter_files

APP = REPO_ROOT / "console" / "app.py"
ADAPTER = "support"
PROMPTS = [
    "Customer: Where is my order 4821?\nAgent:",
    "Customer: Can I return a blender?\nAgent:",
    "Customer: Do you ship abroad?\nAgent:",
    "Customer: My parcel arrived damaged.\nAgent:",
]


@dataclass
class ConsoleTenant:
    url: str
    tenant: str
    key: str
    reviewer_key: str
    admin_key: str

    def api(self) -> Gateway:
        return Gateway(self.url, self.key)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )


def until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.3)
    return value


def complete(http: httpx.Client, prompt: str, model: str = ADAPTER) -> dict:
    reply = http.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="session")
def console_tenant(stack) -> ConsoleTenant:
    return new_console_tenant(stack)


def new_console_tenant(stack) -> ConsoleTenant:
    """A tenant of its own: `support` v1 (retailer's demo weights) and v2 (bank's, of another
    rank), v2 serving; four completions on it, counted by analytics and queued for review."""
    admin = httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=120
    )
    tenant = f"console-{uuid.uuid4().hex[:6]}"
    admin.post("/admin/tenants", json={"tenant": tenant}).raise_for_status()
    key = admin.post(f"/admin/tenants/{tenant}/keys").json()["api_key"]
    reviewer = admin.post(f"/admin/tenants/{tenant}/keys", json={"scope": "reviewer"})
    for demo in ("retailer", "bank"):
        files = [("files", item) for item in adapter_files(DEMO_ADAPTERS / demo).items()]
        registered = admin.post(
            f"/admin/tenants/{tenant}/adapters", data={"name": ADAPTER}, files=files
        )
        assert registered.status_code == 201, registered.text
    made = ConsoleTenant(stack.url, tenant, key, reviewer.json()["api_key"], stack.admin_key)
    http = made.http()
    for prompt in PROMPTS:
        complete(http, prompt)
    queued = lambda: http.get("/feedback/stats").json()["queued"] >= len(PROMPTS)  # noqa: E731
    counted = lambda: (  # noqa: E731
        http.get(f"/analytics/adapters/{ADAPTER}").json()["metrics"]["requests"] >= len(PROMPTS)
    )
    assert until(queued) and until(counted), "the outputs did not reach the queue and analytics"
    return made


@pytest.fixture
def console_url(stack, monkeypatch: pytest.MonkeyPatch) -> str:
    """The app reads the gateway's address from LORAPLEX_URL, as `make run` sets it."""
    monkeypatch.setenv("LORAPLEX_URL", stack.url)
    return stack.url


def tab_test(tab: str, api: Gateway, timeout: float = 60) -> AppTest:
    """One tab's render(api), signed in as `api`, in Streamlit's own test runner."""
    script = f"import streamlit as st\nfrom console.tabs import {tab}\n"
    at = AppTest.from_string(
        f"{script}{tab}.render(st.session_state['api'])\n", default_timeout=timeout
    )
    at.session_state["api"] = api
    return at


def texts(at: AppTest) -> str:
    """Everything a person reads on the page, as one string."""
    parts: list[str] = []
    for kind in ("markdown", "caption", "info", "success", "warning", "error", "subheader", "code"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(parts)


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
