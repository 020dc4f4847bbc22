"""Training (zero-code): pick a data source, keep or change the defaults, start, watch the
progress and the loss; then send the candidate to an experiment, promote or discard it; and
federate adapters. Built on the /training routes (issue 11): where the gateway has none (404)
or no training service behind them (503), the tab says so and offers nothing else."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from console import ui
from console.client import ApiError, Gateway

ACTIVE = {"JOB_STATE_QUEUED", "JOB_STATE_RUNNING"}
FEDERATION = {
    "stack": "stack: exact (rank = sum of ranks)",
    "svd": "svd: best rank-r approximation",
    "fedavg": "fedavg: average A and B (inexact)",
}


def render(api: Gateway) -> None:
    try:
        jobs = api.training_jobs()
    except ApiError as err:
        if err.not_deployed:
            st.info(
                "**Training service not available.** This gateway has no training routes "
                f"or no training service behind them ({err}). The other tabs work as usual.",
                icon=":material/construction:",
            )
        else:
            st.error(str(err), icon=":material/error:")
        return
    mine = ui.state(api)
    with st.expander("New training job", expanded=not jobs):
        _new_job(api, mine)
    if jobs:
        _jobs(api, mine, jobs)
    _candidates(api)
    with st.expander("Federation"):
        _federation(api)


def _new_job(api: Gateway, mine: dict) -> None:
    own = ui.adapter_names(api, own_only=True)
    source = st.radio(
        "Data",
        ["feedback", "upload"],
        horizontal=True,
        key="train_source",
        format_func={
            "feedback": "this tenant's reviewed feedback",
            "upload": "a JSON Lines file (TRL format)",
        }.get,
    )
    # Outside the form: ticking it shows the fields at once (a form reruns only on submit).
    change = st.checkbox("Change the defaults", key="train_change")
    with st.form("new_job"):
        cols = st.columns(3)
        adapter = cols[0].text_input("Adapter name", value=own[0] if own else "my-adapter")
        method = cols[1].selectbox("Method", ["sft", "dpo"], format_func=str.upper)
        resume = cols[2].checkbox("Continue from its current version", value=bool(own))
        upload = None
        if source == "upload":
            upload = st.file_uploader("Dataset", type=["jsonl", "json"])
        params: dict = {}
        if change:  # unset fields keep the service's defaults
            cols = st.columns(4)
            params["rank"] = cols[0].number_input("LoRA rank", 1, 256, 8)
            params["learning_rate"] = cols[1].number_input(
                "Learning rate", 1e-6, 0.1, 2e-4, format="%.1e"
            )
            params["max_steps"] = cols[2].number_input("Max steps (0: epochs)", 0, 100_000, 0)
            params["epochs"] = cols[3].number_input("Epochs", 1, 100, 1)
            cols = st.columns(3)
            params["batch_size"] = cols[0].number_input("Batch size", 1, 256, 4)
            params["heldout_fraction"] = cols[1].number_input("Held out", 0.01, 0.5, 0.1)
            params["seed"] = cols[2].number_input("Seed", 0, 2**31, 0)
            if not params["max_steps"]:
                del params["max_steps"]
        if not st.form_submit_button("Start training", type="primary"):
            return
    if source == "upload":
        if upload is None:
            st.error("Choose a JSON Lines file to train on.")
            return
        data = {"upload": {"jsonl": upload.getvalue().decode("utf-8", errors="replace")}}
    else:
        data = {"feedback": {}}
    body = {"adapter": adapter.strip(), "method": method, "data": data, "params": params}
    if resume:
        body["init_adapter"] = {"name": adapter.strip()}
    job = ui.attempt(api.create_training_job, body)
    if job is not None:
        mine["job"] = job["id"]
        st.rerun()


def _jobs(api: Gateway, mine: dict, jobs: list[dict]) -> None:
    st.subheader("Jobs")
    st.dataframe(
        pd.DataFrame(
            {
                "job": j["id"],
                "adapter": j["adapter"],
                "method": j["method"].removeprefix("TRAINING_METHOD_"),
                "state": j["state"].removeprefix("JOB_STATE_").lower(),
                "step": f"{j['progress']['step']}/{j['progress']['total_steps']}",
                "loss": j["progress"]["loss"],
                "data": j["data_source"],
                "candidate": _ref(j.get("candidate")),
            }
            for j in jobs
        ),
        hide_index=True,
    )
    ids = [j["id"] for j in jobs]
    default = ids.index(mine["job"]) if mine.get("job") in ids else 0
    job_id = st.selectbox("Job", ids, index=default, key="train_job")
    mine["job"] = job_id
    active = next(j for j in jobs if j["id"] == job_id)["state"] in ACTIVE
    # While the job runs, only this part reruns, every second.
    st.fragment(run_every=1.0 if active else None)(_progress)(api, mine, job_id)


def _progress(api: Gateway, mine: dict, job_id: str) -> None:
    job = ui.attempt(api.training_job, job_id)
    if job is None:
        return
    p = job["progress"]
    state = job["state"].removeprefix("JOB_STATE_").lower()
    if job["state"] in ACTIVE:
        mine["watching"] = job_id
    elif mine.pop("watching", None) == job_id:
        st.rerun()  # the whole page: the job list changes, and the polling stops
    done = p["step"] / p["total_steps"] if p["total_steps"] else 0.0
    if state == "succeeded":
        done = 1.0
    st.progress(done, text=f"{state}: step {p['step']} of {p['total_steps'] or '?'} ({done:.0%})")
    history = mine.setdefault(f"loss:{job_id}", {})
    if p["step"]:
        history[p["step"]] = (p["loss"], p.get("eval_loss"))
    cols = st.columns(4)
    cols[0].metric("Loss", f"{p['loss']:.4f}" if p["step"] else "-")
    cols[1].metric("Eval loss", f"{p['eval_loss']:.4f}" if p.get("eval_loss") is not None else "-")
    cols[2].metric("Tokens / s", f"{p['tokens_per_second']:.0f}")
    cols[3].metric("ETA", f"{p['eta_seconds']:.0f} s" if state == "running" else "-")
    if len(history) > 1:
        frame = pd.DataFrame(
            [(s, loss, ev) for s, (loss, ev) in sorted(history.items())],
            columns=["step", "loss", "eval loss"],
        )
        st.line_chart(frame, x="step", y=["loss", "eval loss"])
    if job.get("error_message"):
        st.error(f"{job['error_message']} ({job['error_reason']})")
    if state in ("queued", "running") and st.button("Cancel job", key="train_cancel"):
        ui.attempt(api.cancel_training_job, job_id)
    if state == "succeeded" and job.get("candidate", {}).get("name"):
        record = job.get("record", {})
        st.success(
            f"Candidate {_ref(job['candidate'])}: held-out loss "
            f"{record.get('eval_loss_before', 0):.4f} → {record.get('eval_loss', 0):.4f}"
        )


def _ref(ref: dict | None) -> str:
    return f"{ref['name']}@{ref['version']}" if ref and ref.get("name") else ""


def _candidates(api: Gateway) -> None:
    candidates = ui.attempt(api.candidates)
    if not candidates:
        return
    st.subheader("Candidates")
    st.dataframe(
        pd.DataFrame(
            {
                "candidate": _ref(c["adapter"]),
                "state": c["state"].removeprefix("CANDIDATE_STATE_").lower(),
                "experiment": c.get("experiment_key", ""),
                "eval loss": c.get("record", {}).get("eval_loss"),
                "job": c.get("job_id", ""),
            }
            for c in candidates
        ),
        hide_index=True,
    )
    refs = {_ref(c["adapter"]): c["adapter"] for c in candidates}
    chosen = st.selectbox("Candidate", list(refs), key="train_candidate")
    ref = refs[chosen]
    cols = st.columns([2, 1, 1, 1])
    traffic = cols[0].slider("Candidate's share of traffic", 0.05, 0.95, 0.5, 0.05)
    if cols[1].button("Start experiment", key="cand_experiment"):
        _candidate_action(api, ref, "experiment", {"candidate_traffic": traffic})
    if cols[2].button("Promote", key="cand_promote", type="primary"):
        _candidate_action(api, ref, "promote")
    if cols[3].button("Discard", key="cand_discard"):
        _candidate_action(api, ref, "discard")


def _candidate_action(api: Gateway, ref: dict, action: str, body: dict | None = None) -> None:
    if ui.attempt(api.candidate_action, ref["name"], ref["version"], action, body) is not None:
        st.toast(f"{ref['name']}@{ref['version']}: {action} done")
        st.rerun()


def _federation(api: Gateway) -> None:
    own = ui.adapter_names(api, own_only=True)
    runs = ui.state(api).setdefault("federations", [])
    with st.form("federate"):
        chosen = st.multiselect("Participants (this tenant's adapters)", own, key="fed_adapters")
        samples = st.text_input("Samples per participant, in order (empty: equal weights)")
        cols = st.columns(3)
        method = cols[0].selectbox(
            "Method", list(FEDERATION), format_func=FEDERATION.get, key="fed_method"
        )
        rank = cols[1].number_input("Rank (svd; 0: the largest participant's)", 0, 256, 0)
        output = cols[2].text_input("Output name", "federated")
        submitted = st.form_submit_button("Federate")
    if submitted:
        _federate(api, runs, chosen, samples, method, int(rank), output.strip())
    if runs:
        st.markdown("**Relative error of each aggregate** (this session's federations)")
        st.dataframe(
            pd.DataFrame(runs[::-1]),
            hide_index=True,
            column_config={"relative error": st.column_config.NumberColumn(format="%.2e")},
        )
        st.caption(
            "||dW aggregate - weighted mean dW|| / ||weighted mean dW|| over all target "
            "layers: float rounding for stack (exact), shrinking with the rank for svd, "
            "off by design for fedavg."
        )


def _federate(
    api: Gateway, runs: list, chosen: list[str], samples: str, method: str, rank: int, output: str
) -> None:
    try:
        counts = [int(x) for x in samples.replace(",", " ").split()]
    except ValueError:
        counts = [-1]
    if (counts and len(counts) != len(chosen)) or any(c < 0 for c in counts):
        st.error("Give one whole number of samples per participant, or none.")
        return
    participants = [
        {"adapter": {"name": name}, "num_samples": counts[i] if counts else 0}
        for i, name in enumerate(chosen)
    ]
    body = {"participants": participants, "method": method, "rank": rank, "output_name": output}
    with st.spinner("Federating: reading the adapters, aggregating, registering the result…"):
        reply = ui.attempt(api.federate, body)
    if reply is None:
        return
    st.success(f"Registered {_ref(reply['adapter'])} (rank {reply['rank']})")
    st.dataframe(
        pd.DataFrame(
            {
                "participant": chosen,
                "samples": [p["num_samples"] for p in participants],
                "weight": reply["weights"],
            }
        ),
        hide_index=True,
    )
    runs.append(
        {
            "result": _ref(reply["adapter"]),
            "method": method,
            "rank": reply["rank"],
            "participants": ", ".join(chosen),
            "relative error": reply["relative_error"],
        }
    )
