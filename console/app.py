"""The loraplex console (Streamlit): sign in with an API key, then one tab per capability.

`python -m console` serves it; every number on it comes from the gateway's HTTP API
(LORAPLEX_URL). The key stays in this browser session's memory, nowhere else.
"""

from __future__ import annotations

import os

import streamlit as st

from console import ui
from console.client import Gateway
from console.tabs import analytics, composition, experiments, review, training

DEFAULT_URL = "http://127.0.0.1:8080"
TABS = {
    "Analytics": analytics.render,
    "A/B Testing": experiments.render,
    "Review": review.render,
    "Composition": composition.render,
    "Training": training.render,
}


def gateway_url() -> str:
    return os.environ.get("LORAPLEX_URL", DEFAULT_URL)


def sign_in() -> None:
    st.title("loraplex console")
    with st.form("sign_in"):
        key = st.text_input("API key", type="password", help="an admin, tenant or reviewer key")
        if not st.form_submit_button("Sign in", type="primary"):
            return
    api = Gateway(gateway_url(), key.strip())
    who = ui.attempt(api.whoami)
    if who is None:
        return
    if who["scope"] == "metrics":
        st.error(
            "A metrics key reads /metrics only: sign in with an admin, tenant or reviewer key."
        )
        return
    st.session_state["api"], st.session_state["who"] = api, who
    st.rerun()


def sign_out() -> None:
    st.session_state.clear()  # the key, the leases, everything of this session


def acting_api(api: Gateway, who: dict) -> Gateway | None:
    """The client for the tenant this session acts for: the admin picks one."""
    if who["scope"] != "admin":
        st.sidebar.markdown(f"Tenant **{who['tenant']}** ({who['scope']} key)")
        return api
    tenants = ui.attempt(api.tenants)
    if not tenants:
        st.info("No tenants yet: create one with POST /admin/tenants.")
        return None
    tenant = st.sidebar.selectbox("Tenant", tenants, key="tenant")
    clients = st.session_state.setdefault("clients", {})
    if tenant not in clients:
        clients[tenant] = api.acting_for(tenant)
    st.sidebar.caption("Signed in with the admin key")
    return clients[tenant]


def main() -> None:
    st.set_page_config(page_title="loraplex console", page_icon=":material/hub:", layout="wide")
    if "api" not in st.session_state:
        sign_in()
        return
    who = st.session_state["who"]
    st.sidebar.title("loraplex")
    st.sidebar.caption(gateway_url())
    api = acting_api(st.session_state["api"], who)
    st.sidebar.button("Sign out", on_click=sign_out)
    if api is None:
        return
    st.session_state.setdefault("reviewer_default", f"console-{api.tenant or who['tenant']}")
    if who["scope"] == "reviewer":  # the review queue only
        st.header("Review")
        review.render(api)
        return
    # Only the open tab runs (and calls the gateway); the URL's ?tab= names it.
    tabs = st.tabs(list(TABS), key="tab", on_change="rerun", bind="query-params")
    for tab, render in zip(tabs, TABS.values(), strict=True):
        if tab.open:
            with tab:
                render(api)


main()
