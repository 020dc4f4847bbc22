"""Composition: the tenant's adapters at their serving versions, the adapter cache per tier,
hot-swap and rollback (each confirmed first), and a playground that runs one prompt against
several adapters, or their composition, side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from console import ui
from console.client import ApiError, Gateway

METHODS = ["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"]
CANDIDATE_STATUS = {
    "CANDIDATE_STATE_CANDIDATE": "candidate",
    "CANDIDATE_STATE_IN_EXPERIMENT": "candidate in an experiment",
    "CANDIDATE_STATE_PROMOTED": "promoted earlier",
    "CANDIDATE_STATE_DISCARDED": "discarded candidate",
}
SWAP_ACTIONS = {"POST /composition/swap": "swap", "POST /composition/rollback": "rollback"}


def render(api: Gateway) -> None:
    adapters = ui.attempt(api.adapters)
    if adapters is None:
        return
    _adapters(adapters)
    own = [a for a in adapters if not a.get("shared")]
    stats = ui.attempt(api.cache_stats)
    if own:
        _versions(api, own, stats)
        _swap(api, own)
        _history(api)
    if stats is not None:
        _cache(stats)
    _playground(api, [a["name"] for a in adapters])


def _adapters(adapters: list[dict]) -> None:
    st.subheader("Adapters")
    if not adapters:
        st.info("No adapters yet: the admin registers them (POST /admin/tenants/{t}/adapters).")
        return
    st.dataframe(
        pd.DataFrame(
            {
                "adapter": a["name"],
                "serving version": a["version"],
                "owner": "platform" if a.get("shared") else a["tenant"],
                "rank": a["rank"],
                "targets": ", ".join(a["target_modules"]),
                "size KiB": round(a["size_bytes"] / 1024, 1),
                "sha256": a["sha256"][:12],
                "registered": a.get("created_at", ""),
            }
            for a in adapters
        ),
        hide_index=True,
    )


def _versions(api: Gateway, own: list[dict], stats: dict | None) -> None:
    """Each version of the tenant's adapters up to the newest known one, with its status:
    current (serving), a training candidate's state, or registered; and whether a cache
    tier holds it now."""
    try:
        candidates = api.candidates()
    except ApiError as err:  # no training service: no candidates to show, nothing else lost
        if not err.not_deployed:
            st.error(str(err), icon=":material/error:")
        candidates = []
    status = {
        (c["adapter"]["name"], c["adapter"]["version"]): CANDIDATE_STATUS.get(c["state"], "")
        for c in candidates
    }
    cached = {
        (a["name"], a["version"]): t["tier"]
        for t in reversed((stats or {}).get("tiers") or [])
        for a in t.get("adapters", [])
    }
    # The gateway lists serving versions only: a version above it (after a rollback) is
    # known from the candidates, or from having served while this session watched.
    seen = ui.state(api).setdefault("newest_version", {})
    rows = []
    for adapter in own:
        name, serving = adapter["name"], adapter["version"]
        newest = max([serving, seen.get(name, 0)] + [v for n, v in status if n == name])
        seen[name] = newest
        for version in range(newest, 0, -1):
            rows.append(
                {
                    "adapter": name,
                    "version": version,
                    "status": "current"
                    if version == serving
                    else status.get((name, version)) or "registered",
                    "cached in": cached.get((name, version), ""),
                }
            )
    st.subheader("Versions")
    st.table(pd.DataFrame(rows), hide_index=True)
    pinned = sum(t.get("pinned", 0) for t in (stats or {}).get("tiers") or [])
    st.caption(
        f"Pinned in the cache: {pinned} entries (the gateway does not say which). "
        "Candidates come from training; swap to any version below."
    )


def _swap(api: Gateway, own: list[dict]) -> None:
    st.subheader("Hot-swap")
    serving = {a["name"]: a["version"] for a in own}
    cols = st.columns([2, 1, 1, 1])
    name = cols[0].selectbox("Adapter", list(serving), key="swap_adapter")
    version = cols[1].number_input("Version", 1, 2**32 - 1, serving[name], key="swap_version")
    mine = ui.state(api)
    pending = mine.get("swap_pending")
    if cols[2].button("Swap…", key="swap"):
        pending = mine["swap_pending"] = ("swap", name, int(version))
    if cols[3].button("Roll back…", key="rollback"):
        pending = mine["swap_pending"] = ("rollback", name, 0)
    if "swap_done" in mine:
        st.success(f"Swapped {mine.pop('swap_done')}")
    if not pending:
        return
    action, target, to = pending
    what = (
        f"serve {target} v{to} instead of v{serving.get(target)}"
        if action == "swap"
        else (f"serve the version of {target} that served before v{serving.get(target)}")
    )
    st.warning(f"Confirm: {what}? Requests that start from now on get it.")
    yes, no = st.columns(2)
    if yes.button("Confirm", type="primary", key="swap_confirm"):
        mine.pop("swap_pending")
        if action == "swap":
            reply = ui.attempt(api.swap, target, to)
        else:
            reply = ui.attempt(api.rollback, target)
        if reply is not None:
            before, now = reply["previous"]["version"], reply["current"]["version"]
            mine["swap_done"] = f"{target}: v{before} → v{now}"
            st.rerun()
    if no.button("Cancel", key="swap_cancel"):
        mine.pop("swap_pending")
        st.rerun()


def _history(api: Gateway) -> None:
    """Swaps and rollbacks from the audit log: only the admin key reads it."""
    with st.expander("Swap history"):
        if not api.tenant:  # a tenant key: the admin acts for a tenant it picked
            st.caption("The swap history is in the audit log, which only the admin key reads.")
            return
        entries = ui.attempt(api.audit, limit=200)
        if entries is None:
            return
        swaps = [e for e in entries if e["action"] in SWAP_ACTIONS][:20]
        if not swaps:
            st.caption("No swaps or rollbacks yet.")
            return
        st.dataframe(
            pd.DataFrame(
                {
                    "when (UTC)": pd.to_datetime(e["at_ms"], unit="ms").strftime(
                        "%Y-%m-%d %H:%M:%S"
                    ),
                    "what": SWAP_ACTIONS[e["action"]],
                    "who": e["actor"],
                    "HTTP status": e["status"],
                }
                for e in swaps
            ),
            hide_index=True,
        )
        st.caption("The audit log records who swapped and when, not the versions.")


def _cache(stats: dict) -> None:
    st.subheader("Adapter cache")
    tiers = stats.get("tiers") or []
    if tiers:
        st.dataframe(
            pd.DataFrame(
                {
                    "tier": t["tier"],
                    "used MiB": round(t["used_bytes"] / 2**20, 2),
                    "capacity MiB": round(t["capacity_bytes"] / 2**20, 1),
                    "entries": t["entries"],
                    "pinned": t["pinned"],
                    "hits": t["hits"],
                    "misses": t["misses"],
                    "evictions": t["evictions"],
                    "load p95 s": round(t["load_seconds_p95"], 4),
                }
                for t in tiers
            ),
            hide_index=True,
        )
    cached = [f"{a['name']} v{a['version']}" for a in stats.get("adapters", [])]
    st.caption("Cached now (most recent first): " + (", ".join(cached) or "none"))


def _playground(api: Gateway, names: list[str]) -> None:
    st.subheader("Playground")
    with st.form("playground"):
        prompt = st.text_area("Prompt", "Customer: Where is my order?\nAgent:", height=80)
        chosen = st.multiselect("Adapters", names, default=names[:2])
        cols = st.columns(4)
        max_tokens = cols[0].number_input("Max tokens", 1, 256, 32)
        temperature = cols[1].number_input("Temperature", 0.0, 2.0, 0.0, 0.1)
        compose = cols[2].checkbox("Also their composition")
        method = cols[3].selectbox("Method", METHODS)
        if not st.form_submit_button("Run", type="primary"):
            return
    if not chosen:
        st.error("Choose at least one adapter.")
        return
    params = {"prompt": prompt, "max_tokens": int(max_tokens), "temperature": temperature}
    runs = [(name, {"model": name, **params}) for name in chosen]
    if compose and len(chosen) > 1:
        weight = 1 / len(chosen)
        mix = {"adapters": [{"adapter": n, "weight": weight} for n in chosen], "method": method}
        base = ui.attempt(_base_model, api)
        if base is None:
            return
        runs.append(
            (f"{method}({' + '.join(chosen)})", {"model": base, "composition": mix, **params})
        )
    columns = st.columns(len(runs))
    with st.spinner("Generating…"):
        for column, (label, body) in zip(columns, runs, strict=True):
            reply = ui.attempt(api.complete, body)
            column.markdown(f"**{label}**")
            if reply is not None:
                column.code(reply["choices"][0]["text"], language=None, wrap_lines=True)
                timing = reply["loraplex"]["timing"]
                column.caption(
                    f"{reply['usage']['completion_tokens']} tokens in "
                    f"{ui.seconds(timing['total_seconds'])}, served by "
                    f"{reply['loraplex']['adapter']['name']}"
                )


def _base_model(api: Gateway) -> str:
    """The base model's id: /v1/models lists it first."""
    return api.request("GET", "/v1/models").json()["data"][0]["id"]
