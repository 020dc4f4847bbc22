"""Review (RLHF): the feedback queue that active learning fills, one leased item at a time at
the top of the page (rating 1-5, thumbs, a pairwise choice, a correction; keys 1-5, U, D,
A, B, S), then the queue's depth and agreement, and the export in each TRL format."""

from __future__ import annotations

import html
import io
import re

import pandas as pd
import streamlit as st

from console import ui
from console.client import Gateway

FORMATS = {"sft": "SFT (prompt, completion)", "dpo": "DPO (chosen, rejected)", "kto": "KTO"}
_REVIEWER = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
ENTROPY_SCALE = 3.0  # nats: a token at or above it is shaded fully
# A token without its text: a small box, outlined so that a certain token still shows.
CELL = (
    "; display: inline-block; width: 1.2em; height: 1.2em; margin-right: 2px;"
    " border: 1px solid #ccc"
)


def render(api: Gateway) -> None:
    reviewer = st.text_input(
        "Reviewer", value=st.session_state.get("reviewer_default", "reviewer"), key="reviewer"
    )
    if not _REVIEWER.fullmatch(reviewer):
        st.error("A reviewer name is 1-128 letters, digits or . _ : @ -")
        return
    mine = ui.state(api)
    if "saved" in mine:  # what the last answer did, and this session's count
        st.caption(f"{mine.pop('saved')} · {mine['reviewed']} reviewed in this session")
    lease = mine.get("lease")
    if lease is None or lease.get("reviewer") != reviewer:
        lease = ui.attempt(api.next_item, reviewer)
        if lease is None:
            return
        lease["reviewer"] = reviewer
        mine["lease"] = lease
    if lease["item"] is None:
        st.info("The queue is empty: nothing to review right now.")
        if st.button("Check again", key="review_refresh"):
            mine.pop("lease", None)
            st.rerun()
    else:
        _item(api, mine, lease)
    _stats(api)
    _export(api)


def _item(api: Gateway, mine: dict, lease: dict) -> None:
    item = lease["item"]
    adapter = item["adapter"]
    served_by = f"{adapter['name']} v{adapter['version']}" if adapter.get("name") else "base model"
    scores = item["scores"]
    st.caption(
        f"Item {item['id']} · {served_by} · uncertainty {item['priority']:.3f} "
        f"(entropy {scores['entropy']:.3f}, max {scores['max_entropy']:.3f}, "
        f"least confidence {scores['least_confidence']:.3f}) · "
        f"reviews {item['reviews']}/{item['reviews_required']}"
    )
    st.markdown("**Prompt**")
    st.code(item["prompt"], language=None, wrap_lines=True)
    alternative = lease.get("alternative")
    if alternative:
        left, right = st.columns(2)
        with left:
            st.markdown("**Output A** (this item)")
            _output(item)
        with right:
            st.markdown(f"**Output B** ({alternative.get('variant') or 'another output'})")
            _output(alternative)
    else:
        st.markdown("**Output**")
        _output(item)

    answer = None
    cols = st.columns(8)
    for stars in range(1, 6):
        if cols[stars - 1].button(f"{stars} ★", key=f"rate_{stars}", shortcut=str(stars)):
            answer = {"rating": stars}
    if cols[5].button("Up", key="thumbs_up", icon=":material/thumb_up:", shortcut="U"):
        answer = {"thumbs": "up"}
    if cols[6].button("Down", key="thumbs_down", icon=":material/thumb_down:", shortcut="D"):
        answer = {"thumbs": "down"}
    if cols[7].button("Skip", key="skip", shortcut="S", help="leave it to its lease's expiry"):
        mine.pop("lease", None)
        st.rerun()
    if alternative:
        a, b = st.columns(2)
        for column, preferred, label in ((a, item, "A"), (b, alternative, "B")):
            if column.button(f"Prefer {label}", key=f"prefer_{label}", shortcut=label):
                answer = {
                    "pairwise": {
                        "other_item_id": alternative["id"],
                        "preferred_item_id": preferred["id"],
                    }
                }
    with st.form("correction", clear_on_submit=True):
        corrected = st.text_area("Corrected output", value=item["output"], height=80)
        if st.form_submit_button("Submit correction") and corrected.strip():
            answer = {"corrected_text": corrected}
    if answer is not None:
        body = {
            "item_id": item["id"],
            "reviewer": lease["reviewer"],
            "lease_id": lease["lease_id"],
            **answer,
        }
        if ui.attempt(api.submit_feedback, body) is not None:
            mine.pop("lease", None)
            mine["reviewed"] = mine.get("reviewed", 0) + 1
            kind, value = next(iter(answer.items()))
            shown = value if kind in ("rating", "thumbs") else "saved"
            mine["saved"] = f"Saved: {kind} {shown} for {item['id']}"
            st.rerun()


def _output(item: dict) -> None:
    """The output with each token shaded by its entropy when the item carries the tokens'
    texts; else the plain output and a strip of the tokens' entropies in order."""
    texts, entropies = item.get("token_texts") or [], item.get("token_entropies") or []
    if texts and len(texts) == len(entropies) and "".join(texts) == item["output"]:
        st.markdown(_shaded(texts, entropies), unsafe_allow_html=True)
        st.caption(f"Shaded by entropy: white 0, darkest {ENTROPY_SCALE:g} nats or more.")
        return
    st.code(item["output"], language=None, wrap_lines=True)
    if entropies:
        st.markdown(_shaded([""] * len(entropies), entropies, cell=CELL), unsafe_allow_html=True)
        st.caption(
            f"Entropy of each of the {len(entropies)} tokens in order (darkest: "
            f"{ENTROPY_SCALE:g} nats or more); this item carries no token texts."
        )


def _shaded(texts: list[str], entropies: list[float], cell: str = "") -> str:
    """HTML: one span per token, its background as dark as its entropy, the value on hover.
    The texts are the model's output, so they are escaped."""
    spans = "".join(
        f'<span title="entropy {e:.2f}" style="background: rgba(230, 80, 0, '
        f'{min(e / ENTROPY_SCALE, 1):.2f}); border-radius: 2px{cell}">{html.escape(t)}</span>'
        for t, e in zip(texts, entropies, strict=True)
    )
    style = "white-space: pre-wrap; line-height: 1.8"
    return f'<div class="token-entropy" style="{style}">{spans}</div>'


def _stats(api: Gateway) -> None:
    stats = ui.attempt(api.feedback_stats)
    if stats is None:
        return
    st.divider()
    cols = st.columns(6)
    cols[0].metric("Queued", stats["queued"], help="waiting for a reviewer, or leased")
    cols[1].metric("Leased", stats["leased"])
    cols[2].metric("Open", stats["open"], help="never selected for review")
    cols[3].metric("Closed", stats["closed"], help="reviewed as often as required")
    cols[4].metric("Alpha, ratings", _alpha(stats["rating_alpha"]), help="Krippendorff's alpha")
    cols[5].metric("Alpha, thumbs", _alpha(stats["thumbs_alpha"]), help="Krippendorff's alpha")
    if stats["feedback"]:
        st.caption(
            "Feedback so far: " + ", ".join(f"{k} {v}" for k, v in stats["feedback"].items())
        )


def _alpha(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _export(api: Gateway) -> None:
    with st.expander("Export for training (TRL JSON Lines)"):
        fmt = st.radio("Format", list(FORMATS), format_func=FORMATS.get, horizontal=True)
        mine = ui.state(api)
        if st.button("Prepare export", key="export_prepare"):
            data = ui.attempt(api.export, fmt)
            if data is not None:
                mine["export"] = (fmt, data)
        if "export" in mine:
            fmt_ready, data = mine["export"]
            rows = data.count(b"\n")
            st.download_button(
                f"Download {fmt_ready}.jsonl ({rows} rows)",
                data,
                file_name=f"feedback-{fmt_ready}.jsonl",
                mime="application/x-ndjson",
            )
            if rows:
                preview = pd.read_json(io.BytesIO(data), lines=True).head(5)
                st.dataframe(preview, hide_index=True)
