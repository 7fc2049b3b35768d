"""The clinicians' console in a real browser: Debian's chromium driven headless by Playwright
against a real `clinicloop serve` on the tiny model, its store and refresh runs seeded (`seed.py`).

One reviewer's session, as the issue describes it: a client key is refused at sign-in; the
reviewer signs in, filters the conversations to a red-flag case on `v1`, opens it, reads the
judge's macro-F1 on /console/calibration, labels a verdict the judge got wrong and sees the number
change, then opens a refresh run's report with its reward curve. Full-page screenshots of the main
pages go to the test's tmp dir, or to `$CLINICLOOP_SCREENSHOTS` (e.g. `docs/console`, relative to
the repo root) when set, which is how the README's screenshots are made.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clinicloop.serving.auth import KeyRing
from clinicloop.store import reviews
from clinicloop.store.db import Store
from clinicloop.verifier.calibration import calibrate_stored
from tests.conftest import ROOT, Server
from tests.serving.console.seed import Seeded, seed, seed_registry

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
CLIENT_KEY, REVIEWER_KEY, ADMIN_KEY = "console-client-key", "console-reviewer-key", \
    "console-admin-key"
WIDTH = 1280
TIMEOUT_MS = 15_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"no {CHROMIUM}: install Debian's chromium (`apt-get install chromium`; .ci/run does)")


def key_id(key: str) -> str:
    caller = KeyRing([key], []).identify(key)
    assert caller is not None and caller.key_id is not None
    return caller.key_id


@dataclass
class Console:
    server: Server
    store_url: str
    seeded: Seeded

    def url(self, path: str) -> str:
        return self.server.base_url + path


@pytest.fixture(scope="module")
def console(server_factory, tiny_model, tmp_path_factory) -> Console:
    root = tmp_path_factory.mktemp("console")
    store_url = f"sqlite:///{root / 'clinicloop.db'}"
    store = Store(store_url)
    store.migrate()
    store.dispose()
    seeded = seed(store_url, root / "runs", reviewer=key_id(REVIEWER_KEY),
                  client_key_id=key_id(CLIENT_KEY))
    seed_registry(root / "registry", tiny_model.gguf_q8_0, tiny_model.name, tiny_model.hf_dir)
    server = server_factory({
        "CLINICLOOP_STORE__URL": store_url,
        "CLINICLOOP_REGISTRY__DIR": str(root / "registry"),
        "CLINICLOOP_SERVER__CONSOLE__RUNS_DIR": str(root / "runs"),
        "CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
        "CLINICLOOP_SERVER__REVIEWER_KEYS": f'["{REVIEWER_KEY}"]',
        "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]',
    })
    return Console(server, store_url, seeded)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": WIDTH, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: `$CLINICLOOP_SCREENSHOTS` (relative to the repo root) if set."""
    chosen = os.environ.get("CLINICLOOP_SCREENSHOTS")
    out = (ROOT / chosen) if chosen else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def sign_in(page, console: Console, key: str) -> int:
    """Submit the login form with `key`; the status of the POST's final page."""
    page.goto(console.url("/console/login"))
    page.fill("form#login input[name=key]", key)
    with page.expect_navigation() as navigation:
        page.click("form#login button[type=submit]")
    response = navigation.value
    assert response is not None
    return response.status


def macro_f1(page, console: Console) -> str:
    page.goto(console.url("/console/calibration"))
    return page.text_content("#macro-f1").strip()


def headline(store_url: str) -> tuple[str, int]:
    """The figures the calibration page leads with: the first judge's (`calibrate_stored` order)
    macro-F1, as the page prints it, and its number of labelled items."""
    store = Store(store_url)
    try:
        first = calibrate_stored(store, bootstrap=10)[0].overall
    finally:
        store.dispose()
    assert first.macro_f1 is not None
    return f"{first.macro_f1:.3f}", first.n


def test_client_key_is_refused(page, console: Console) -> None:
    assert sign_in(page, console, CLIENT_KEY) == 403
    error = page.text_content("#login-error")
    assert error is not None and "client" in error.lower(), error
    # Not signed in: the console sends the browser back to the sign-in form.
    page.goto(console.url("/console/conversations"))
    assert page.url.startswith(console.url("/console/login"))


def test_reviewer_workflow(page, console: Console, shots: Path) -> None:
    seeded = console.seeded
    page.goto(console.url("/console/login"))
    page.screenshot(path=shots / "login.png", full_page=True)
    assert sign_in(page, console, REVIEWER_KEY) == 200
    assert page.url.startswith(console.url("/console/conversations"))

    # Every client conversation (the judge's own traffic is not one), unreviewed first.
    rows = page.locator("table#conversations tr[data-conversation-id]")
    assert rows.count() == len(seeded.conversations)
    assert str(len(seeded.conversations)) in page.text_content("#total")
    assert rows.first.get_attribute("data-conversation-id") == \
        seeded.conversations[seeded.target]
    page.screenshot(path=shots / "conversations.png", full_page=True)

    # The red-flag cases on v1: the chest-pressure conversation alone.
    version = page.locator("form#filters [name=version]")
    if version.evaluate("e => e.tagName") == "SELECT":
        version.select_option("v1")
    else:
        version.fill("v1")
    page.check("form#filters input[name=red_flags]")
    with page.expect_navigation():
        page.click("form#filters [type=submit]")
    assert "red_flags=1" in page.url and "version=v1" in page.url
    assert rows.count() == 1
    row = rows.first
    assert row.get_attribute("data-conversation-id") == seeded.conversations[seeded.target]
    assert row.locator(".red-flags").text_content().strip() == \
        str(seeded.red_flags[seeded.target])
    with page.expect_navigation():
        row.locator("a.conversation-link").click()
    conversation_url = page.url
    assert seeded.conversations[seeded.target] in conversation_url
    assert page.locator("section.turn[data-turn-id]").count() == \
        len(seeded.turns[seeded.target])

    before, n_before = headline(console.store_url)
    assert macro_f1(page, console) == before
    assert page.text_content("#n-labels").strip() == str(n_before)
    assert page.locator("table#disagreements tr.disagreement").count() > 0
    page.screenshot(path=shots / "calibration.png", full_page=True)

    # Back on the conversation: the reviewer says the judge was wrong on one item.
    page.go_back()
    assert page.url == conversation_url
    turn = page.locator(f"section.turn[data-turn-id='{seeded.target_turn}']")
    verdict = turn.locator(f"tr.verdict[data-item-key='{seeded.target_item_key}']")
    reviewed_score = turn.locator(".reviewed-score").text_content()
    judge_said = "met" if seeded.target_judge_met else "not met"
    assert verdict.locator(".judge-met").text_content().strip() == judge_said
    assert not verdict.locator(".label").text_content().strip()
    disagree = "false" if seeded.target_judge_met else "true"
    with page.expect_navigation():
        verdict.locator(f"form.label-form button[name=criteria_met][value={disagree}]").click()
    assert page.url.split("#")[0] == conversation_url.split("#")[0]
    # The label shows with who gave it, and the turn's reviewed score follows it.
    assert key_id(REVIEWER_KEY) in verdict.locator(".label").text_content()
    assert turn.locator(".reviewed-score").text_content() != reviewed_score
    page.screenshot(path=shots / "conversation.png", full_page=True)

    store = Store(console.store_url)
    try:
        label = reviews.latest_labels(store, [seeded.target_turn])[
            (seeded.target_turn, seeded.target_item_key)]
        assert label.criteria_met != seeded.target_judge_met
        assert label.reviewer == key_id(REVIEWER_KEY)
    finally:
        store.dispose()
    # The item was graded under both templates: the label counts in every calibration.
    after, n_after = headline(console.store_url)
    assert (after, n_after) != (before, n_before) and n_after == n_before + 1
    assert macro_f1(page, console) == after
    assert page.text_content("#n-labels").strip() == str(n_after)

    # Versions: the registry's history and the refresh run's report with its plot.
    page.goto(console.url("/console/versions"))
    states = {r.get_attribute("data-version"): r.locator(".state").text_content().strip()
              for r in page.locator("table#versions tr[data-version]").all()}
    assert states.get("base") == "active" and states.get("v1", "").startswith("canary"), states
    assert page.locator("table#events tr").count() > 1
    page.screenshot(path=shots / "versions.png", full_page=True)
    with page.expect_navigation():
        page.click(f"table#runs a.run-link[href$='/console/runs/{seeded.run_id}']")
    image = page.locator("img.reward-curve")
    image.wait_for()
    page.wait_for_function("img => img.complete", arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") > 0
    page.screenshot(path=shots / "run.png", full_page=True)

    # Signing out ends the session.
    with page.expect_navigation():
        page.click("form#logout [type=submit]")
    page.goto(console.url("/console/conversations"))
    assert page.url.startswith(console.url("/console/login"))
