"""In a real browser (chromium via Playwright, as tests/test_console_browser.py): an operator finds
a hostile message delivered to Dovecot by its subject and opens it; its HTML shows in the
sandboxed frame, and nothing in it runs (no dialog, no console error) or fetches from elsewhere
(a listener at its remote image's address receives no request)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from localmail.dovecot import LocalDovecot, free_loopback_port
from tests.console_helpers import Console
from tests.test_console_browser import Page, browser, serving  # noqa: F401 (fixtures)
from tests.test_console_messages import (
    HOSTILE_NAME,
    HOSTILE_SUBJECT,
    alice_console,
    deliver_and_index,
    hostile_message,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server standing for a remote image host: its address and the paths asked of it."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_loopback_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, name="remote-image-host", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_a_hostile_message_is_found_and_shown_without_running_or_fetching_anything(
    tmp_path: Path,
    dovecot: LocalDovecot,
    listener: tuple[str, list[str]],
    browser: Any,  # noqa: F811
) -> None:
    remote, asked = listener
    console: Console = alice_console(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}", dovecot)
    pk = deliver_and_index(console.engine, dovecot, hostile_message(f"{remote}/pixel.gif"))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with serving(console) as base:
        tab = Page(browser, base)
        dialogs: list[str] = []
        errors: list[str] = []
        tab.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        # Every console error but the browser's own ask for a favicon (the console has none).
        tab.page.on(
            "console",
            lambda m: (
                errors.append(f"{m.text} {m.location}")
                if m.type == "error" and not m.location["url"].endswith("/favicon.ico")
                else None
            ),
        )
        tab.sign_in("otto")
        tab.page.get_by_role("navigation", name="Main").get_by_role("link", name="Search").click()
        tab.page.get_by_role("heading", name="Search").wait_for()
        tab.page.get_by_label("Query").fill("subject:invoice")
        tab.page.get_by_role("button", name="Search").click()
        result = tab.page.get_by_role("link", name=HOSTILE_SUBJECT)
        result.wait_for()
        # The hostile name is shown as text, not made an element.
        assert tab.page.get_by_role("row").filter(has_text=HOSTILE_NAME).count() == 1
        tab.page.screenshot(path=str(shots / "search.png"), full_page=True)
        result.click()
        tab.page.get_by_role("heading", name=f"Message {pk}").wait_for()
        assert tab.page.url == f"{base}/messages/{pk}?account=alice%40example.test"
        frame = tab.page.frame_locator("iframe.html-body")
        frame.get_by_text("sanitized text here").wait_for()  # the frame rendered
        # Every image of the frame has finished loading (or failing): none is left to fetch.
        framed = next(
            f for f in tab.page.frames if f.url.endswith(f"/messages/{pk}/html?account=alice%40example.test")
        )
        framed.wait_for_function("Array.from(document.images).every(image => image.complete)")
        assert framed.evaluate("document.images.length") == 2
        tab.page.get_by_text("2 remote images blocked").wait_for()
        tab.page.get_by_role("link", name='../evil"name.html').wait_for()
        tab.page.screenshot(path=str(shots / "message.png"), full_page=True)
        assert dialogs == [] and errors == [] and tab.violations == []
        assert asked == []
        tab.page.close()
