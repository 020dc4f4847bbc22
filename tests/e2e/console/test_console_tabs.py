"""Each console tab in Streamlit's own test runner (AppTest) against the real stack: what a
person sees after each action, checked against what the gateway then says."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from console.client import Gateway
from tests.e2e.console.conftest import (
    ADAPTER,
    APP,
    PROMPTS,
    ConsoleTenant,
    no_errors,
    tab_test,
    texts,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sign_in(key: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.text_input[0].input(key)
    return at.button[0].click().run()


def test_sign_in_by_key_scope(console_url: str, console_tenant: ConsoleTenant) -> None:
    # A tenant key: its own tenant, every tab.
    at = sign_in(console_tenant.key)
    no_errors(at)
    assert [t.label for t in at.tabs] == [
        "Analytics",
        "A/B Testing",
        "Review",
        "Composition",
        "Training",
    ]
    assert f"Tenant **{console_tenant.tenant}** (tenant key)" in texts(at.sidebar)
    # The admin key: a tenant picker over every tenant.
    at = sign_in(console_tenant.admin_key)
    no_errors(at)
    picker = at.sidebar.selectbox(key="tenant")
    assert {console_tenant.tenant, "retailer", "bank", "airline"} <= set(picker.options)
    picker.set_value(console_tenant.tenant).run()
    no_errors(at)
    assert at.selectbox(key="analytics_adapter").value == ADAPTER
    # A reviewer key: the review screen and nothing else.
    at = sign_in(console_tenant.reviewer_key)
    no_errors(at)
    assert not at.tabs and [h.value for h in at.header] == ["Review"]
    # Keys that cannot sign in: a readable message, no trace.
    for key, message in [
        ("lpx_not-a-key", "invalid API key (API_KEY_INVALID, HTTP 401)"),
        (_metrics_key(console_tenant), "A metrics key reads /metrics only"),
    ]:
        at = sign_in(key)
        assert not at.exception
        assert message in at.error[0].value
        assert "api" not in at.session_state


def _metrics_key(tenant: ConsoleTenant) -> str:
    reply = httpx.post(
        f"{tenant.url}/admin/metrics-keys",
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
    )
    return reply.json()["api_key"]


def test_analytics_shows_the_adapters_traffic(console_tenant: ConsoleTenant) -> None:
    at = tab_test("analytics", console_tenant.api()).run()
    no_errors(at)
    gateway = console_tenant.http().get(f"/analytics/adapters/{ADAPTER}").json()["metrics"]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Requests"] == f"{gateway['requests']:,}" and gateway["requests"] >= len(PROMPTS)
    assert shown["Success rate"] == "100.0 %"
    assert shown["Latency p95"] not in ("", "-")
    assert len(at.get("vega_lite_chart")) == 2  # requests and latency over the window
    # Top performers ranks the adapter; version 2 served every request, version 1 none.
    assert ADAPTER in at.dataframe[0].value["adapter"].tolist()
    versions = at.dataframe[1].value
    assert versions.loc["v2", "requests"] == gateway["requests"]
    assert versions.loc["v1", "requests"] == 0


def test_an_experiment_is_created_started_and_stopped(console_tenant: ConsoleTenant) -> None:
    key = f"console-{uuid.uuid4().hex[:6]}"
    at = tab_test("experiments", console_tenant.api()).run()
    no_errors(at)
    at.number_input(key="ab_count").set_value(3).run()  # three variants
    at.text_input[0].input(key)
    for i, (adapter, weight) in enumerate([(ADAPTER, 0.5), ("(base model)", 0.3), (ADAPTER, 0.2)]):
        at.selectbox(key=f"ab_adapter_{i}").set_value(adapter)
        at.number_input(key=f"ab_weight_{i}").set_value(weight)
    at.multiselect(key="ab_guardrails").set_value(["latency_ms"])
    at.button[0].click().run()  # the form's submit button
    no_errors(at)
    experiment = console_tenant.http().get(f"/ab-testing/experiments/{key}").json()
    assert experiment["status"] == "EXPERIMENT_STATUS_DRAFT"
    variants = [
        (v["name"], [a["name"] for a in v["adapters"]], v["traffic_weight"])
        for v in experiment["variants"]
    ]
    assert variants == [
        ("control", [ADAPTER], 0.5),
        ("treatment", [], 0.3),
        ("treatment-2", [ADAPTER], 0.2),
    ]
    assert [m["name"] for m in experiment["guardrail_metrics"]] == ["latency_ms"]
    assert at.selectbox(key="ab_experiment").value == key
    assert f"**{key}** is **draft**" in texts(at)
    at.button(key="ab_start").click().run()
    no_errors(at)
    assert f"**{key}** is **running**" in texts(at)
    assert "Recommendation:" in texts(at)
    at.button(key="ab_stop").click().run()
    no_errors(at)
    status = console_tenant.http().get(f"/ab-testing/experiments/{key}").json()["status"]
    assert status == "EXPERIMENT_STATUS_STOPPED"
    # The gateway's refusal reads as its message: a second experiment with the same key.
    at.text_input[0].input(key)
    at.button[0].click().run()
    assert not at.exception
    assert "ALREADY_EXISTS" in at.error[0].value or "EXISTS" in at.error[0].value


def test_the_sample_size_calculator_agrees_with_the_experiments_service() -> None:
    from console.tabs.experiments import required_units
    from services.experiments.stats import required_sample_size

    for baseline, mde in [(0.5, 0.05), (0.1, 0.2), (0.9, -0.05)]:
        assert required_units(baseline, mde, 0.05, 0.8) == required_sample_size(baseline, mde)
    assert required_units(4.0, 0.05, 0.05, 0.9, stddev=1.2) == required_sample_size(
        4.0, 0.05, power=0.9, variance=1.44
    )


def test_review_rates_one_item_after_another(console_tenant: ConsoleTenant) -> None:
    api = Gateway(console_tenant.url, console_tenant.reviewer_key)
    before = api.feedback_stats()
    at = tab_test("review", api)
    at.session_state["reviewer_default"] = f"ana-{uuid.uuid4().hex[:4]}"
    at.run()
    no_errors(at)
    seen = []
    for answer in ("rate_4", "thumbs_up", "rate_2"):
        assert at.code[0].value in PROMPTS  # the prompt, at the top
        item = next(c.value for c in at.caption if c.value.startswith("Item "))
        seen.append(item.split(" · ")[0])
        # Served with max_tokens 8: at most 8 tokens, each shaded by its entropy in the
        # output's text; the item's entropy score is their mean.
        assert "Shaded by entropy" in texts(at)
        leased = at.session_state["per_tenant"]["_own"]["lease"]["item"]
        pieces, entropies = leased["token_texts"], leased["token_entropies"]
        assert 1 <= len(pieces) == len(entropies) <= 8
        assert "".join(pieces) == leased["output"]
        shaded = next(m.value for m in at.markdown if "token-entropy" in m.value)
        assert shaded.count("<span ") == len(pieces)
        mean = sum(entropies) / len(entropies)
        assert f"(entropy {mean:.3f}," in item
        at.button(key=answer).click().run()
        no_errors(at)
    assert len(set(seen)) == 3  # a new item each time
    assert at.caption[0].value.startswith("Saved: rating 2 for ")
    assert at.caption[0].value.endswith("3 reviewed in this session")
    after = api.feedback_stats()
    assert after["closed"] == before["closed"] + 3
    assert after["feedback"].get("rating", 0) == before["feedback"].get("rating", 0) + 2
    assert f"Closed: {after['closed']}" in texts(at)
    # The export offers what was just reviewed.
    at.button(key="export_prepare").click().run()
    no_errors(at)
    assert at.get("download_button")


def test_composition_swaps_after_confirmation_and_rolls_back(
    console_tenant: ConsoleTenant,
) -> None:
    http = console_tenant.http()

    def serving() -> int:
        adapters = http.get("/composition/adapters").json()["adapters"]
        return next(a["version"] for a in adapters if a["name"] == ADAPTER)

    def statuses(at: AppTest) -> dict[int, str]:
        versions = at.table[0].value
        return dict(zip(versions["version"], versions["status"], strict=True))

    at = tab_test("composition", console_tenant.api()).run()
    no_errors(at)
    assert at.dataframe[0].value["serving version"].tolist()[0] == serving() == 2
    assert statuses(at) == {2: "current", 1: "registered"}
    assert "only the admin key reads" in texts(at)  # the swap history, for a tenant key
    at.number_input(key="swap_version").set_value(1)
    at.button(key="swap").click().run()
    assert "Confirm: serve support v1 instead of v2?" in texts(at)
    assert serving() == 2  # nothing happens before the confirmation
    at.button(key="swap_confirm").click().run()
    no_errors(at)
    assert serving() == 1
    assert "Swapped support: v2 → v1" in texts(at)
    assert statuses(at) == {2: "registered", 1: "current"}
    at.button(key="rollback").click().run()
    at.button(key="swap_confirm").click().run()
    no_errors(at)
    assert serving() == 2
    # A version that does not exist: the gateway's reason, the serving version unchanged.
    at.number_input(key="swap_version").set_value(9)
    at.button(key="swap").click().run()
    at.button(key="swap_confirm").click().run()
    assert not at.exception and "ADAPTER_NOT_FOUND" in at.error[0].value
    assert serving() == 2


def test_the_playground_runs_adapters_and_their_composition(
    console_tenant: ConsoleTenant,
) -> None:
    at = tab_test("composition", console_tenant.api()).run()
    at.multiselect[0].set_value([ADAPTER])
    at.checkbox[0].check()
    at.button[-1].click().run()  # Run
    no_errors(at)
    assert "**support**" in texts(at)
    assert "served by support" in texts(at)


def test_the_admin_acts_for_the_tenant_it_picked(console_tenant: ConsoleTenant) -> None:
    admin = Gateway(console_tenant.url, console_tenant.admin_key).acting_for(console_tenant.tenant)
    assert [a["name"] for a in admin.adapters()] == [ADAPTER]
    admin.rollback(ADAPTER)  # a change made for the tenant is the admin's in the audit log
    admin.swap(ADAPTER, 2)
    # The Composition tab shows the admin that history, newest first.
    at = tab_test("composition", admin).run()
    no_errors(at)
    history = next(d.value for d in at.dataframe if "what" in d.value.columns)
    assert history["what"].tolist()[:2] == ["swap", "rollback"]
    assert history["who"].tolist()[:2] == ["admin", "admin"]
    audit = httpx.get(
        f"{console_tenant.url}/admin/audit",
        params={"tenant": console_tenant.tenant, "limit": 2},
        headers={"Authorization": f"Bearer {console_tenant.admin_key}"},
    ).json()["entries"]
    assert [(e["actor"], e["action"]) for e in audit] == [
        ("admin", "POST /composition/swap"),
        ("admin", "POST /composition/rollback"),
    ]


def test_review_shades_each_token_by_its_entropy() -> None:
    """The item's tokens, each with its entropy: shaded in order, the text escaped (it is
    the model's output), the value on hover."""
    pieces, entropies = ["Agent:", " <b>no</b>", " refund", "."], [0.3, 3.6, 1.5, 0.0]
    item = {
        "id": "c1",
        "prompt": "Customer: Can I return it?",
        "output": "".join(pieces),
        "adapter": {"name": "support", "version": 2},
        "scores": {"entropy": 1.35, "max_entropy": 3.6, "least_confidence": 0.9},
        "priority": 1.35,
        "reviews": 0,
        "reviews_required": 1,
        "token_entropies": entropies,
        "token_texts": pieces,
    }
    stats = {"queued": 1, "leased": 1, "open": 0, "closed": 0, "feedback": {}}

    def gateway(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/feedback/next":
            return httpx.Response(200, json={"item": item, "lease_id": "l1", "alternative": None})
        return httpx.Response(200, json={**stats, "rating_alpha": None, "thumbs_alpha": None})

    api = Gateway("http://gateway", "lpx_key", transport=httpx.MockTransport(gateway))
    at = tab_test("review", api).run()
    no_errors(at)
    shaded = next(m.value for m in at.markdown if "token-entropy" in m.value)
    span = r'<span title="entropy ([\d.]+)" style="background: [^;]*, ([\d.]+)\)'
    spans = re.findall(span, shaded)
    # Alpha = entropy / 3 nats, capped at 1 (hand-computed).
    assert spans == [("0.30", "0.10"), ("3.60", "1.00"), ("1.50", "0.50"), ("0.00", "0.00")]
    assert "&lt;b&gt;no&lt;/b&gt;" in shaded and "<b>" not in shaded
    assert "Shaded by entropy" in texts(at)
    # An item without the tokens' texts: the plain output and a strip of its entropies.
    del item["token_texts"]
    at = tab_test("review", api).run()
    no_errors(at)
    assert at.code[1].value == item["output"]
    assert "entropy of each of the 4 tokens" in texts(at).lower()
