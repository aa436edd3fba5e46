"""In a real browser (chromium via Playwright, as tests/test_console_browser.py): the Overview
follows the index live. A message delivered to Dovecot and synced shows in the folder's count
without a reload; an operator's Drafts page offers retry and
cancel behind a confirmation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emailops.imap.connection import connect
from emailops.imap.sync import FolderSync
from localmail.dovecot import LocalDovecot
from tests.console_helpers import Console, add_failed_model_job
from tests.index_helpers import ACCOUNT, ALICE, imap_config, message, sync_config
from tests.test_console_browser import Page, browser, served  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(240)


def test_the_overview_shows_a_delivered_message_without_a_reload(
    tmp_path: Path,
    served: tuple[str, Console],  # noqa: F811
    browser: Any,  # noqa: F811
    dovecot: LocalDovecot,
) -> None:
    base, console = served
    shots = tmp_path / "screenshots"
    shots.mkdir()
    sync = FolderSync(console.engine, sync_config(), "INBOX")
    dovecot.deliver(ALICE, message(0))
    sync.sync(connect(imap_config(dovecot)))
    tab = Page(browser, base)
    tab.sign_in("otto")
    row = tab.page.locator(f'[id="folder-{ACCOUNT}/INBOX"]')
    count = row.locator("td.number")
    assert count.inner_text() == "1"
    tab.page.evaluate("document.body.dataset.loadedOnce = 'yes'")  # gone if the page reloads
    dovecot.deliver(ALICE, message(1))
    sync.sync(connect(imap_config(dovecot)))
    count.filter(has_text="2").wait_for(timeout=15_000)
    assert tab.page.evaluate("document.body.dataset.loadedOnce") == "yes"
    tab.page.get_by_role("button", name="Fetch INBOX now").wait_for()
    tab.page.screenshot(path=str(shots / "overview.png"), full_page=True)

    job_id = add_failed_model_job(console.engine)
    tab.page.get_by_role("navigation", name="Main").get_by_role("link", name="Drafts").click()
    tab.page.get_by_role("heading", name="Drafts").wait_for()
    tab.page.once("dialog", lambda dialog: dialog.accept())
    tab.page.get_by_role("button", name=f"Retry job {job_id}").click()
    tab.page.get_by_role("status").filter(has_text=f"Model job {job_id}: retry done, now pending.").wait_for()
    tab.page.screenshot(path=str(shots / "drafts.png"), full_page=True)
    assert tab.violations == []
