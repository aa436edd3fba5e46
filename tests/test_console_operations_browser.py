"""In a real browser (chromium via Playwright, as tests/test_console_browser.py): an operator marks
an unknown reply sent on the Outbox page (after its confirmation), switches to the other mail
account with the keyboard alone and marks its reply sent too, and releases a quarantined message on
the Quarantine page; the admin then finds each in the audit log, under its own account."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emailops.audit import list_entries
from emailops.auth.crypto import new_key
from emailops.store.database import reading
from tests.console_helpers import BOB_KEY, Console, add_unknown_reply_and_quarantined_message
from tests.test_console_account_choice import HELP_KEY, add_accounts, mailbox
from tests.test_console_browser import Page, browser, served  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(240)


def test_an_operator_resolves_and_releases_and_both_are_in_the_audit_log(
    served: tuple[str, Console],  # noqa: F811
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    base, console = served
    reply_id, pk = add_unknown_reply_and_quarantined_message(console.engine)
    add_accounts(console.engine, new_key(), mailbox("help", "carol@example.test"))
    help_reply, _ = add_unknown_reply_and_quarantined_message(console.engine, HELP_KEY)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    tab = Page(browser, base)
    tab.sign_in("otto")
    main_nav = tab.page.get_by_role("navigation", name="Main")
    main_nav.get_by_role("link", name="Outbox").click()
    tab.page.get_by_role("heading", name="Outbox").wait_for()
    confirmations: list[str] = []
    tab.page.once("dialog", lambda dialog: (confirmations.append(dialog.message), dialog.accept()))
    tab.page.get_by_role("button", name=f"Mark sent reply {reply_id}").click()
    resolved = f"Reply {reply_id} of bob@example.test resolved as sent: now sent."
    tab.page.get_by_role("status").filter(has_text=resolved).wait_for()
    assert tab.page.get_by_role("button", name=f"Mark sent reply {reply_id}").count() == 0
    assert confirmations == [f"Mark sent reply {reply_id} (Re: question to carol@example.org)?"]
    assert tab.page.get_by_role("button", name=f"Mark sent reply {help_reply}").count() == 0  # not shown

    # The keyboard alone: Tab to the account chooser, type the account's first letter, Tab to
    # "Show", Enter. The address then names the account, and the navigation keeps it.
    chooser = tab.page.get_by_label("Account")
    for _ in range(40):
        if chooser.evaluate("element => element === document.activeElement"):
            break
        tab.page.keyboard.press("Tab")
    assert chooser.evaluate("element => element === document.activeElement")
    tab.page.keyboard.press("h")
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.textContent") == "Show"
    tab.page.keyboard.press("Enter")
    tab.page.get_by_role("button", name=f"Mark sent reply {help_reply}").wait_for()
    assert tab.page.url == f"{base}/outbox?account=help"
    assert chooser.input_value() == "help"
    assert main_nav.get_by_role("link", name="Quarantine").get_attribute("href") == "/quarantine?account=help"
    tab.page.screenshot(path=str(shots / "outbox-of-help.png"), full_page=True)
    tab.page.once("dialog", lambda dialog: (confirmations.append(dialog.message), dialog.accept()))
    tab.page.get_by_role("button", name=f"Mark sent reply {help_reply}").click()
    resolved = f"Reply {help_reply} of help resolved as sent: now sent."
    tab.page.get_by_role("status").filter(has_text=resolved).wait_for()
    assert confirmations[-1].startswith(f"Mark sent reply {help_reply} (")

    # Back to bob's, again by the keyboard (the chooser keeps its place in the page).
    chooser.focus()
    tab.page.keyboard.press("b")
    tab.page.keyboard.press("Tab")
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_url(f"{base}/outbox?account=bob%40example.test")
    main_nav.get_by_role("link", name="Quarantine").click()
    tab.page.get_by_role("heading", name="Quarantine").wait_for()
    tab.page.get_by_label("Account").wait_for()
    assert tab.page.get_by_label("Account").input_value() == "bob@example.test"
    tab.page.get_by_role("button", name="Release INBOX 7").click()
    released = f"Message rules-{pk} of bob@example.test: released"
    tab.page.get_by_role("status").filter(has_text=released).wait_for()
    tab.page.get_by_text("No message is quarantined.").wait_for()
    assert tab.violations == []
    tab.page.close()

    admin = Page(browser, base)
    admin.sign_in("ann")
    admin.page.goto(base + "/audit")
    for action, target in (
        ("outbox.resolve", f"{BOB_KEY}/outbox:{reply_id}"),
        ("outbox.resolve", f"{HELP_KEY}/outbox:{help_reply}"),
        ("quarantine.release", f"{BOB_KEY}/quarantine.rules:{pk}"),
    ):
        row = admin.page.get_by_role("row").filter(has_text=action).filter(has_text=target)
        assert row.count() == 1 and "otto" in row.inner_text() and "127.0.0.1" in row.inner_text()
    with reading(console.engine) as conn:
        done = [
            (e.actor, e.action) for e in list_entries(conn, actions=["outbox.resolve", "quarantine.release"])
        ]
    assert sorted(done) == [
        ("otto", "outbox.resolve"),
        ("otto", "outbox.resolve"),
        ("otto", "quarantine.release"),
    ]
    assert admin.violations == []
