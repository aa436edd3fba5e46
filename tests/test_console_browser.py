"""The operator console in a real browser: Debian's chromium driven by Playwright, against the app
served by uvicorn on a loopback port. Screenshots of each page go to the test's tmp folder.

The browser is /usr/bin/chromium (bin/test installs the Debian package; Playwright never downloads
one). Without it these tests fail under CI and are skipped elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from localmail.dovecot import free_loopback_port
from tests.console_helpers import PASSWORDS, Console, MovingClock, add_users, console_settings
from tests.index_helpers import index_engine

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.timeout(240)


def _browser_or_fail() -> Any:
    """Playwright's sync API; fails without the browser (bin/test installs both), never skips."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        pytest.fail("the browser tests need playwright (pip) and Debian's chromium at /usr/bin/chromium")
    return sync_playwright


@contextmanager
def serving(console: Console) -> Iterator[str]:
    """``console`` served by uvicorn on a loopback port: its base address."""
    console.clock.now = console.clock.now.now(console.clock.now.tzinfo)  # the browser's time
    port = free_loopback_port()
    server = uvicorn.Server(
        uvicorn.Config(console.app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="console-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Console]]:
    """The console on a loopback port, with the users ann (admin), otto (operator), vic (viewer)."""
    db_url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    engine = index_engine(db_url)
    add_users(engine)
    console = Console(console_settings(tmp_path, db_url), engine, MovingClock())
    with serving(console) as base:
        yield base, console


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_playwright = _browser_or_fail()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A browser tab that records what the Content-Security-Policy refused."""

    def __init__(self, browser: Any, base: str, **options: Any) -> None:
        """``options`` go to Playwright's ``new_page`` (a viewport, a device scale factor)."""
        self.page = browser.new_page(**options)
        self.base = base
        self.violations: list[str] = []
        self.page.on(
            "console",
            lambda message: (
                self.violations.append(message.text) if "Content Security Policy" in message.text else None
            ),
        )

    def sign_in(self, name: str) -> None:
        self.page.goto(self.base + "/")
        self.page.get_by_label("Username").fill(name)
        self.page.get_by_label("Password").fill(PASSWORDS[name])
        self.page.get_by_role("button", name="Sign in").click()
        self.page.get_by_role("button", name="Sign out").wait_for()


def test_each_role_signs_in_and_sees_its_pages_a_viewer_no_action(
    served: tuple[str, Console], browser: Any, tmp_path: Path
) -> None:
    base, _ = served
    shots = tmp_path / "screenshots"
    shots.mkdir()
    expected_nav = {
        "vic": ["Overview", "Search", "Outbox", "Quarantine", "Drafts", "Rules", "Settings"],
        "otto": ["Overview", "Search", "Outbox", "Quarantine", "Drafts", "Rules", "Settings"],
        "ann": [
            "Overview",
            "Search",
            "Outbox",
            "Quarantine",
            "Drafts",
            "Rules",
            "Accounts",
            "Users",
            "Audit log",
            "Settings",
        ],
    }
    for name, labels in expected_nav.items():
        tab = Page(browser, base)
        tab.page.goto(base + "/sign-in")
        tab.page.screenshot(path=str(shots / "sign-in.png"), full_page=True)
        tab.sign_in(name)
        nav = tab.page.get_by_role("navigation", name="Main").get_by_role("link")
        assert nav.all_inner_texts() == labels
        for label in labels:
            tab.page.get_by_role("navigation", name="Main").get_by_role("link", name=label).click()
            tab.page.wait_for_function(
                "label => document.querySelector('h1') && document.querySelector('h1').textContent === label",
                arg=label,
            )
            tab.page.screenshot(
                path=str(shots / f"{name}-{label.lower().replace(' ', '-')}.png"), full_page=True
            )
            buttons = tab.page.get_by_role("button").all_inner_texts()
            if name != "ann":  # no action; Search's button only searches, Show only shows an account
                searching = ["Search"] if label == "Search" else []
                choosing = ["Show"] if label in {"Outbox", "Quarantine", "Drafts", "Rules"} else []
                # An operator tests rules: the file chooser (a button without text) and the submit.
                tests_rules = ["", "Test the rules"] if (name, label) == ("otto", "Rules") else []
                assert buttons == ["Sign out", *choosing, *searching, *tests_rules], (name, label, buttons)
        if name == "vic":
            token = tab.page.locator('input[name="csrf_token"]').first.get_attribute("value")
            answer = tab.page.request.post(
                base + "/users/ann/disable", form={"csrf_token": token}, headers={"Origin": base}
            )
            assert answer.status == 403
            assert tab.page.request.get(base + "/users").status == 403
        assert tab.violations == []
        tab.page.close()
    assert len(list(shots.glob("*.png"))) == 1 + 7 + 7 + 10


def test_keyboard_only_sign_in_and_an_admin_action_through_htmx(
    served: tuple[str, Console], browser: Any
) -> None:
    base, _ = served
    tab = Page(browser, base)
    tab.page.goto(base + "/users")
    assert tab.page.evaluate("document.activeElement.id") == "username"  # autofocus
    tab.page.keyboard.type("ann")
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.id") == "password"
    tab.page.keyboard.type(PASSWORDS["ann"])
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.textContent") == "Sign in"
    tab.page.keyboard.press("Enter")
    tab.page.get_by_role("heading", name="Users").wait_for()
    assert tab.page.url == base + "/users"  # back where the visit started

    # A boosted form: htmx sends the session's CSRF token in its header.
    tab.page.get_by_role("button", name="Disable vic").click()
    tab.page.get_by_role("status").filter(has_text="vic is disabled.").wait_for()
    tab.page.get_by_role("button", name="Enable vic").wait_for()
    assert tab.page.evaluate("typeof htmx") == "object"
    assert tab.violations == []
