"""The console in a real browser: headless Debian chromium (playwright drives it) on the page
that `python -m services.stack` serves, over the real gateway. A person's path: sign in with
the retailer's key, read the demo adapter's analytics, rate an item of the review queue with
the keyboard, create, start and stop an experiment, find training unavailable. Screenshots
of each tab go to tests/artifacts/ (docs/console.md shows two of them)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.settings import REPO_ROOT
from tests.e2e.console.conftest import PROMPTS, complete, until

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
DEMO_ADAPTER = "retailer-support"
WAIT_MS = 30_000


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


def test_a_tenant_works_through_the_console(stack, page) -> None:
    key = stack.keys["RETAILER_KEY"]
    http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    before = http.get(f"/analytics/adapters/{DEMO_ADAPTER}").json()["metrics"]["requests"]
    for prompt in PROMPTS[:2]:
        complete(http, prompt, model=DEMO_ADAPTER)
    assert until(
        lambda: (
            http.get(f"/analytics/adapters/{DEMO_ADAPTER}").json()["metrics"]["requests"]
            >= before + 2
        )
    )

    # Sign in: the key goes into a password field and the retailer's tabs appear.
    page.goto(stack.console_url)
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("tab", name="Analytics").wait_for()
    page.get_by_text("Tenant retailer (tenant key)").wait_for()

    # Analytics of the demo adapter: the page's count is the gateway's.
    page.get_by_text("Top performers").wait_for()
    requests = http.get(f"/analytics/adapters/{DEMO_ADAPTER}").json()["metrics"]["requests"]
    assert int(metric(page, "Requests").replace(",", "")) == requests >= 2
    assert metric(page, "Success rate").endswith("%")
    assert page.get_by_text(DEMO_ADAPTER).first.is_visible()
    shot(page, "analytics")

    # Review: the item's prompt at the top; the key 4 rates it and the next item comes.
    closed = http.get("/feedback/stats").json()["closed"]
    open_tab(page, "Review")
    page.get_by_text("Prompt", exact=True).wait_for()
    first = page.get_by_text(re.compile(r"^Item \S+ · ")).inner_text().split(" · ")[0]
    shot(page, "review")
    page.get_by_text("Prompt", exact=True).click()  # focus on the page, not in a field
    page.keyboard.press("4")
    assert until(lambda: http.get("/feedback/stats").json()["closed"] == closed + 1)
    page.get_by_text(re.compile(f"^Saved: rating 4 for {first[5:]}")).wait_for()
    assert page.get_by_text(re.compile(r"^Item \S+ · ")).inner_text().split(" · ")[0] != first

    # A/B testing: create, start, stop; the gateway agrees at each step.
    experiment = f"browser-{uuid.uuid4().hex[:6]}"
    open_tab(page, "A/B Testing")
    page.get_by_text("Sample-size calculator").wait_for()
    if not page.get_by_label("Key", exact=True).is_visible():
        page.get_by_text("New experiment").click()
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

    open_tab(page, "Composition")
    page.get_by_text("Adapter cache").wait_for()
    shot(page, "composition")
    open_tab(page, "Training")
    training = http.get("/training/jobs").status_code
    if training in (404, 503):
        page.get_by_text("Training service not available.").wait_for()
    else:
        page.get_by_role("button", name="Start training").wait_for()
    shot(page, "training")
    # Nothing on the page is a stack trace.
    assert not page.locator('[data-testid="stException"]').count()
