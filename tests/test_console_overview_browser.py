"""In a real browser (chromium via Playwright, as tests/test_console_browser.py): the Overview
follows the index live. A message delivered to Dovecot and synced shows in the folder's count
without a reload; an operator's Drafts page offers retry and
cancel behind a confirmation; a rules edit with an error is refused at its line and a good one is
saved and loaded at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emailops.imap.connection import connect
from emailops.imap.sync import FolderSync
from emailops.rules import RuleSetCache, load_rules
from localmail.dovecot import LocalDovecot
from tests.console_helpers import Console, add_failed_model_job
from tests.index_helpers import ACCOUNT, ALICE, imap_config, message, sync_config
from tests.test_console_browser import Page, browser, served  # noqa: F401 (fixtures)
from tests.test_console_rules import ACK, BAD, THANKS

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
    # alice's mailbox is no account of this deployment (bob is): its folder is named by its key.
    tab.page.get_by_role("button", name=f"Fetch INBOX of {ACCOUNT} now").wait_for()
    tab.page.screenshot(path=str(shots / "overview.png"), full_page=True)

    job_id = add_failed_model_job(console.engine)
    tab.page.get_by_role("navigation", name="Main").get_by_role("link", name="Drafts").click()
    tab.page.get_by_role("heading", name="Drafts").wait_for()
    tab.page.once("dialog", lambda dialog: dialog.accept())
    tab.page.get_by_role("button", name=f"Retry job {job_id}").click()
    retried = f"Model job {job_id} of bob@example.test: retry done, now pending."
    tab.page.get_by_role("status").filter(has_text=retried).wait_for()
    tab.page.screenshot(path=str(shots / "drafts.png"), full_page=True)
    assert tab.violations == []


def test_a_rules_edit_with_an_error_is_refused_at_its_line_and_a_good_one_runs_at_once(
    tmp_path: Path,
    served: tuple[str, Console],  # noqa: F811
    browser: Any,  # noqa: F811
) -> None:
    base, console = served
    rules_file = console.settings.rules_file
    rules_file.write_text(ACK, encoding="utf-8")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    tab = Page(browser, base)
    tab.sign_in("ann")
    tab.page.get_by_role("navigation", name="Main").get_by_role("link", name="Rules").click()
    editor = tab.page.get_by_label("Rules (TOML)")
    editor.fill(BAD)
    tab.page.get_by_role("button", name="Save").click()
    problem = tab.page.locator("#problem-line-14")
    problem.wait_for()
    assert "line 14:" in problem.inner_text() and "once_per_sender_days" in problem.inner_text()
    assert rules_file.read_text(encoding="utf-8") == ACK
    tab.page.screenshot(path=str(shots / "rules-refused.png"), full_page=True)
    assert tab.violations == []

    tab.page.get_by_label("Rules (TOML)").fill(THANKS)
    tab.page.get_by_role("button", name="Check and show the change").click()
    tab.page.locator("pre.diff").filter(has_text='+name = "thanks"').wait_for()
    tab.page.get_by_role("button", name="Save").click()
    tab.page.get_by_role("status").filter(has_text="the daemon runs it from its next message").wait_for()
    tab.page.get_by_role("row").filter(has_text="thanks").first.wait_for()
    assert [rule.name for rule in load_rules(rules_file).rules] == ["ack", "thanks"]
    # What the daemon loads at its next message is the saved file (its cache sees a new inode).
    cache = RuleSetCache(rules_file)
    assert [rule.name for rule in cache.get().rules] == ["ack", "thanks"]
    tab.page.screenshot(path=str(shots / "rules-saved.png"), full_page=True)
