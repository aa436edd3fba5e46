"""In a real browser (chromium via Playwright, as tests/test_console_browser.py): an operator marks
an unknown reply sent on the Outbox page and releases a quarantined message on the Quarantine page;
the admin then finds both in the audit log."""

from __future__ import annotations

from typing import Any

import pytest

from emailops.audit import list_entries
from emailops.store.database import reading
from tests.console_helpers import Console, add_unknown_reply_and_quarantined_message
from tests.test_console_browser import Page, browser, served  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(240)


def test_an_operator_resolves_and_releases_and_both_are_in_the_audit_log(
    served: tuple[str, Console],  # noqa: F811
    browser: Any,  # noqa: F811
) -> None:
    base, console = served
    reply_id, pk = add_unknown_reply_and_quarantined_message(console.engine)
    tab = Page(browser, base)
    tab.sign_in("otto")
    main_nav = tab.page.get_by_role("navigation", name="Main")
    main_nav.get_by_role("link", name="Outbox").click()
    tab.page.get_by_role("heading", name="Outbox").wait_for()
    tab.page.get_by_role("button", name=f"Mark sent reply {reply_id}").click()
    resolved = f"Reply {reply_id} of bob@example.test resolved as sent: now sent."
    tab.page.get_by_role("status").filter(has_text=resolved).wait_for()
    assert tab.page.get_by_role("button", name=f"Mark sent reply {reply_id}").count() == 0

    main_nav.get_by_role("link", name="Quarantine").click()
    tab.page.get_by_role("heading", name="Quarantine").wait_for()
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
        ("outbox.resolve", f"outbox:{reply_id}"),
        ("quarantine.release", f"quarantine.rules:{pk}"),
    ):
        row = admin.page.get_by_role("row").filter(has_text=action).filter(has_text=target)
        assert row.count() == 1 and "otto" in row.inner_text() and "127.0.0.1" in row.inner_text()
    with reading(console.engine) as conn:
        done = [
            (e.actor, e.action) for e in list_entries(conn, actions=["outbox.resolve", "quarantine.release"])
        ]
    assert sorted(done) == [("otto", "outbox.resolve"), ("otto", "quarantine.release")]
    assert admin.violations == []
