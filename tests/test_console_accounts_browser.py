"""In a real browser (chromium via Playwright, as tests/test_console_browser.py): an OAuth2 account
whose sign-in Dovecot refuses (its refresh token revoked at LocalOAuth2Server) is named by a banner
on every page, for a viewer without a link, for the admin with one; "Test connection" shows the
servers' own refusals; the admin reconnects it through the test authorization server's sign-in page
(code flow with PKCE), after which it signs in to Dovecot again. Screenshots go to the test's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emailops.audit import list_entries
from emailops.store.database import reading
from localmail.dovecot import LocalDovecot
from localmail.oauth2_server import LocalOAuth2Server
from tests.console_helpers import OAUTH2_ACCOUNT, PASSWORD_ACCOUNT, accounts_console, record_refusal
from tests.index_helpers import ALICE
from tests.oauth2_helpers import auth_server, dovecot_oauth2  # noqa: F401 (fixtures)
from tests.test_console_browser import Page, browser, serving  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(240)
BANNER = f"The mail server refuses the sign-in of account {OAUTH2_ACCOUNT}"


def test_an_admin_reconnects_a_refused_oauth2_account_in_the_browser(
    tmp_path: Path,
    browser: Any,  # noqa: F811
    dovecot_oauth2: LocalDovecot,  # noqa: F811
    auth_server: LocalOAuth2Server,  # noqa: F811
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    console, _ = accounts_console(
        tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}", dovecot_oauth2, auth_server
    )
    refusal = record_refusal(console, OAUTH2_ACCOUNT)
    with serving(console) as base:
        viewer = Page(browser, base)
        viewer.sign_in("vic")
        viewer.page.get_by_role("alert").filter(has_text=BANNER).wait_for()
        assert viewer.page.get_by_role("link", name=f"Check or reconnect {OAUTH2_ACCOUNT}").count() == 0
        viewer.page.screenshot(path=str(shots / "viewer-banner.png"), full_page=True)
        viewer.page.close()

        tab = Page(browser, base)
        page = tab.page
        tab.sign_in("ann")
        page.get_by_role("alert").filter(has_text=BANNER).wait_for()
        page.screenshot(path=str(shots / "admin-banner.png"), full_page=True)

        # The password account: Dovecot's own refusal.
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Accounts").click()
        page.get_by_role("heading", name="Accounts").wait_for()
        page.screenshot(path=str(shots / "accounts.png"), full_page=True)
        page.get_by_role("link", name=PASSWORD_ACCOUNT).click()
        page.get_by_role("heading", name=f"Account {PASSWORD_ACCOUNT}").wait_for()
        page.get_by_role("button", name="Test connection").click()
        page.locator("#test-result").filter(
            has_text="[AUTHENTICATIONFAILED] Authentication failed."
        ).wait_for()
        page.screenshot(path=str(shots / "test-password-refused.png"), full_page=True)

        # The OAuth2 account: the authorization server's refusal of its revoked grant.
        page.get_by_role("link", name=f"Check or reconnect {OAUTH2_ACCOUNT}").click()
        page.get_by_role("heading", name=f"Account {OAUTH2_ACCOUNT}").wait_for()
        assert page.locator("#account-state").filter(has_text="auth_failed").count() == 1
        page.get_by_role("button", name="Test connection").click()
        page.locator("#test-result").filter(has_text="AADSTS70000: the refresh token was revoked").wait_for()
        assert "AADSTS70000" in refusal
        page.screenshot(path=str(shots / "test-oauth2-refused.png"), full_page=True)

        # Reconnect: the authorization server's sign-in page, then back to the console.
        page.get_by_role("link", name=f"Reconnect {OAUTH2_ACCOUNT}", exact=True).click()
        page.get_by_role("heading", name="Sign in to allow").wait_for()
        assert page.url.startswith(auth_server.authorize_url + "?")
        assert "code_challenge_method=S256" in page.url
        page.get_by_label("Mailbox").fill(ALICE)
        page.screenshot(path=str(shots / "authorization-server.png"), full_page=True)
        page.get_by_role("button", name="Allow").click()
        page.get_by_role("heading", name=f"Reconnected {OAUTH2_ACCOUNT}").wait_for()
        assert page.url.startswith(base + "/oauth2/callback?")
        page.screenshot(path=str(shots / "reconnected.png"), full_page=True)
        page.get_by_role("link", name="Back to the account").click()
        page.get_by_role("heading", name=f"Account {OAUTH2_ACCOUNT}").wait_for()
        assert page.get_by_role("alert").filter(has_text=BANNER).count() == 0
        assert page.locator("#account-state").filter(has_text="auth_failed").count() == 0

        # It signs in to Dovecot again, with a token of the new grant.
        page.get_by_role("button", name="Test connection").click()
        page.locator("#test-result").filter(has_text=f"signed in as {ALICE}; folders: INBOX").wait_for()
        page.screenshot(path=str(shots / "test-oauth2-signed-in.png"), full_page=True)
        assert auth_server.count("token:authorization_code") == 1
        assert tab.violations == []
    with reading(console.engine) as conn:
        done = [
            (e.actor, e.action, e.target) for e in list_entries(conn, actions=["account.oauth_reconnect"])
        ]
    assert done == [("ann", "account.oauth_reconnect", OAUTH2_ACCOUNT)]
    assert len(list(shots.glob("*.png"))) == 8
