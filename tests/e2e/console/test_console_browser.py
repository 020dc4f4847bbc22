"""The console in a real browser: headless Debian chromium (playwright drives it) on the page
that `python -m services.stack` serves, over the real gateway and services. A person's path,
in a tenant of its own: sign in, read the adapter's analytics, review three items with the
keyboard, create, start and stop an experiment, hot-swap the adapter to another version
(confirmed first) and see it current, train on an uploaded file and watch the job reach
100 %. Screenshots of each tab go to tests/artifacts/ (docs/console.md shows some of them)."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.settings import REPO_ROOT
from tests.e2e.console.conftest import ADAPTER, new_console_tenant

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
DEMO_ADAPTER = "retailer-support"
WAIT_MS = 30_000
TRAINING_MS = 180_000  # a job: the worker loads the model, trains, evaluates


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: `make browser` installs Debian's package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_timeout(500)  # let charts finish drawing
    page.screenshot(path=ARTIFACTS / f"console-{name}.png", full_page=True)


def metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.get_by_role("tab", name=name, selected=True).wait_for()


def item_id(page) -> str:
    """The id of the item on screen, from its caption "Item <id> · ..."."""
    return page.get_by_text(re.compile(r"^Item \S+ · ")).inner_text().split(" · ")[0][5:]


def sft_file(tmp_path: Path) -> Path:
    """A small SFT dataset in TRL's prompt-completion form, as a person would upload it."""
    rows = [
        {
            "prompt": f"Customer: Where is order {n}?\nAgent:",
            "completion": f" Order {n} ships today.",
        }
        for n in range(1000, 1012)
    ]
    path = tmp_path / "support-sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_tenant_works_through_the_console(stack, page, tmp_path) -> None:
    tenant = new_console_tenant(stack)
    http = tenant.http()

    # Sign in: the key goes into a password field and the tenant's tabs appear.
    page.goto(stack.console_url)
    page.get_by_label("API key", exact=True).fill(tenant.key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("tab", name="Analytics").wait_for()
    page.get_by_text(f"Tenant {tenant.tenant} (tenant key)").wait_for()

    # Analytics of the adapter: the page's count is the gateway's.
    page.get_by_text("Top performers").wait_for()
    requests = http.get(f"/analytics/adapters/{ADAPTER}").json()["metrics"]["requests"]
    assert int(metric(page, "Requests").replace(",", "")) == requests >= 4
    assert metric(page, "Success rate") == "100.0 %"
    shot(page, "analytics")

    # Review: three items one after another, each answered with a key; each answer is saved
    # at once and the next item takes its place.
    open_tab(page, "Review")
    page.get_by_text("Prompt", exact=True).wait_for()
    # the output's tokens (at most the 8 generated), each shaded by its entropy
    page.get_by_text(re.compile(r"^Shaded by entropy")).first.wait_for()
    tokens = page.locator("div.token-entropy").first.locator('span[title^="entropy "]')
    tokens.first.wait_for()
    assert 1 <= tokens.count() <= 8
    shot(page, "review")
    closed = http.get("/feedback/stats").json()["closed"]
    seen = []
    for key, saved in [("4", "rating 4"), ("5", "rating 5"), ("u", "thumbs up")]:
        seen.append(item_id(page))
        page.get_by_text("Prompt", exact=True).click()  # focus on the page, not in a field
        page.keyboard.press(key)
        page.get_by_text(f"Saved: {saved} for {seen[-1]} · {len(seen)} reviewed").wait_for()
    assert len(set(seen)) == 3
    assert http.get("/feedback/stats").json()["closed"] == closed + 3
    assert item_id(page) not in seen  # the fourth item is up

    # A/B testing: create, start, stop; the gateway agrees at each step.
    experiment = f"browser-{uuid.uuid4().hex[:6]}"
    open_tab(page, "A/B Testing")
    page.get_by_text("Sample-size calculator").wait_for()
    page.get_by_label("Key", exact=True).fill(experiment)
    page.get_by_role("button", name="Create experiment").click()
    page.get_by_text(f"{experiment} is draft").wait_for()

    def status() -> str:
        return http.get(f"/ab-testing/experiments/{experiment}").json()["status"]

    assert status() == "EXPERIMENT_STATUS_DRAFT"
    page.get_by_role("button", name="Start", exact=True).click()
    page.get_by_text(f"{experiment} is running").wait_for()
    assert status() == "EXPERIMENT_STATUS_RUNNING"
    page.get_by_text("Recommendation:").wait_for()
    shot(page, "ab-testing")
    page.get_by_role("button", name="Stop", exact=True).click()
    page.get_by_text(f"{experiment} is stopped").wait_for()
    assert status() == "EXPERIMENT_STATUS_STOPPED"

    # Composition: swap to v1, confirmed first; v1 is then the current version.
    def serving() -> int:
        adapters = http.get("/composition/adapters").json()["adapters"]
        return next(a["version"] for a in adapters if a["name"] == ADAPTER)

    open_tab(page, "Composition")
    page.get_by_text("Adapter cache").wait_for()
    assert version_status(page) == {"2": "current", "1": "registered"}
    page.get_by_label("Version", exact=True).fill("1")
    page.get_by_label("Version", exact=True).press("Tab")
    page.get_by_role("button", name="Swap…").click()
    page.get_by_text(f"Confirm: serve {ADAPTER} v1 instead of v2?").wait_for()
    assert serving() == 2  # nothing before the confirmation
    page.get_by_role("button", name="Confirm").click()
    page.get_by_text(f"Swapped {ADAPTER}: v2 → v1").wait_for()
    assert serving() == 1
    assert version_status(page) == {"2": "registered", "1": "current"}
    shot(page, "composition")

    # Training: an uploaded file, two steps of batch 2; the bar reaches 100 %.
    open_tab(page, "Training")
    page.get_by_text("a JSON Lines file (TRL format)").click()
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
        sft_file(tmp_path)
    )
    page.get_by_text("support-sft.jsonl").wait_for()
    page.get_by_text("Change the defaults").click()
    for label, value in [("Max steps (0: epochs)", "2"), ("Batch size", "2")]:
        page.get_by_label(label, exact=True).fill(value)
        page.get_by_label(label, exact=True).press("Tab")
    page.get_by_role("button", name="Start training").click()
    page.get_by_text("succeeded: step 2 of 2 (100%)").wait_for(timeout=TRAINING_MS)
    page.get_by_text(re.compile(rf"^Candidate {ADAPTER}@3: held-out loss")).wait_for()
    jobs = http.get("/training/jobs").json()["jobs"]
    assert [(j["state"], j["progress"]["step"]) for j in jobs] == [("JOB_STATE_SUCCEEDED", 2)]
    shot(page, "training")
    # Nothing on the page is a stack trace.
    assert not page.locator('[data-testid="stException"]').count()


def version_status(page) -> dict[str, str]:
    """The Versions table as {version: status}."""
    table = page.locator('[data-testid="stTable"]').first
    table.wait_for()
    rows = table.locator("tbody tr")
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(rows.count())]
    return {row[1]: row[2] for row in cells}
