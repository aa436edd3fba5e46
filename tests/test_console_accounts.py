"""The console's Accounts page in-process, against Dovecot (OAuth2 sign-in through LocalOAuth2Server):
settings with secrets masked, state and last error, the banner of a refused account, "Test
connection" with the server's own refusal, fetch now, enable/disable, and the OAuth2 reconnect with
PKCE; each action audited, each form needing its CSRF token; on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sqlalchemy import select

from emailops.accounts.store import MASK
from emailops.audit import list_entries
from emailops.auth.errors import OAuth2RefusedError
from emailops.auth.token_endpoint import TokenEndpoint
from emailops.store.account_state import read_state
from emailops.store.database import reading
from emailops.store.folders import ensure_folder
from emailops.store.schema import accounts, folders
from emailops.users import accounts as users
from localmail.dovecot import LocalDovecot
from localmail.oauth2_server import LocalOAuth2Server, s256
from prod.cli_accounts import try_sign_in
from prod.console.guard import BAD_CSRF_TOKEN
from tests.console_helpers import (
    BASE,
    CLI,
    OAUTH2_ACCOUNT,
    PASSWORD_ACCOUNT,
    SECRETS,
    Console,
    accounts_console,
    record_refusal,
)
from tests.index_helpers import ACCOUNT, ALICE
from tests.oauth2_helpers import (  # noqa: F401 (fixtures)
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN_KEY,
    auth_server,
    dovecot_oauth2,
    oauth2_config,
)

pytestmark = pytest.mark.timeout(240)
DOVECOT_REFUSAL = "[AUTHENTICATIONFAILED] Authentication failed."
ALICE_PAGE = f"/accounts/{OAUTH2_ACCOUNT}"


@pytest.fixture
def setup(
    tmp_path: Path,
    db_url: str,
    dovecot_oauth2: LocalDovecot,  # noqa: F811
    auth_server: LocalOAuth2Server,  # noqa: F811
) -> tuple[Console, str]:
    return accounts_console(tmp_path, db_url, dovecot_oauth2, auth_server)


def _audit(console: Console, action: str) -> list[Any]:
    with reading(console.engine) as conn:
        return list_entries(conn, actions=[action])


def _enabled(console: Console) -> bool:
    with reading(console.engine) as conn:
        return bool(
            conn.execute(select(accounts.c.enabled).where(accounts.c.name == OAUTH2_ACCOUNT)).scalar_one()
        )


def test_the_page_shows_each_account_masked_with_its_state_and_a_banner_while_refused(
    setup: tuple[Console, str],
) -> None:
    console, refresh_token = setup
    refusal = record_refusal(console, OAUTH2_ACCOUNT)
    assert "invalid_grant" in refusal and "AADSTS70000" in refusal  # the token endpoint's words
    ann, _ = console.session("ann")
    answers = [ann.get("/accounts"), ann.get(ALICE_PAGE), ann.get(f"/accounts/{PASSWORD_ACCOUNT}")]
    listing, alice, bob = answers
    assert all(answer.status_code == 200 for answer in answers)
    assert OAUTH2_ACCOUNT in listing.text and PASSWORD_ACCOUNT in listing.text
    assert "auth_failed" in alice.text and refusal.replace('"', "&#34;") in alice.text
    assert "Reconnect" in alice.text and "Reconnect" not in bob.text
    assert alice.text.count(MASK) == 2 and bob.text.count(MASK) == 1  # client secret, refresh token; password
    api = ann.get(f"/api/v1{ALICE_PAGE}")
    answers.append(api)
    body = api.json()
    assert (body["id"], body["url"]) == (OAUTH2_ACCOUNT, f"{BASE}{ALICE_PAGE}")
    assert (body["state"], body["last_error"], body["reconnect"]) == ("auth_failed", refusal, True)
    assert body["settings"]["oauth2_client_secret"] == body["settings"]["oauth2_refresh_token"] == MASK
    assert body["settings"]["oauth2_authorize_url"].endswith("/authorize")

    # The banner: on every page, for every role; the link to the account only for an admin.
    vic, _ = console.session("vic")
    for client, page in ((vic, "/"), (vic, "/settings"), (ann, "/rules")):
        answer = client.get(page)
        answers.append(answer)
        assert f"refuses the sign-in of account <strong>{OAUTH2_ACCOUNT}</strong>" in answer.text, page
        assert (f'href="{ALICE_PAGE}"' in answer.text) is (client is ann), page
    # The overview's list of accounts is still the viewers'.
    overview_accounts = vic.get("/api/v1/accounts")
    answers.append(overview_accounts)
    assert overview_accounts.status_code == 200 and overview_accounts.json()["id"] == "accounts"
    assert vic.get("/accounts").status_code == 403

    for answer in answers:
        for secret in (CLIENT_SECRET, refresh_token, TOKEN_KEY, SECRETS["email_password"]):
            assert secret not in answer.text, (answer.url, secret)


def test_test_connection_shows_the_servers_own_refusal_audited_and_needs_the_csrf_token(
    setup: tuple[Console, str],
) -> None:
    console, _ = setup
    ann, csrf = console.session("ann")
    target = f"/accounts/{PASSWORD_ACCOUNT}/test"
    refused = ann.post(target, data={}, headers={"Origin": BASE})
    assert refused.status_code == 403 and BAD_CSRF_TOKEN in refused.text
    assert _audit(console, "account.test") == []

    answer = ann.post(target, data={"csrf_token": csrf}, headers={"Origin": BASE})
    assert answer.status_code == 200 and DOVECOT_REFUSAL in answer.text
    assert "A server refused or failed." in answer.text and SECRETS["email_password"] not in answer.text
    (entry,) = _audit(console, "account.test")
    assert (entry.actor, entry.target, entry.after["ok"]) == ("ann", PASSWORD_ACCOUNT, False)
    assert DOVECOT_REFUSAL in entry.after["imap_error"]

    token = users.issue_api_token(console.engine, "ann", actor=CLI)
    api = console.client().post(f"/api/v1{target}", headers={"Authorization": f"Bearer {token}"})
    body = api.json()
    assert api.status_code == 200 and (body["id"], body["url"]) == (
        PASSWORD_ACCOUNT,
        f"{BASE}/accounts/{PASSWORD_ACCOUNT}",
    )
    assert DOVECOT_REFUSAL in body["test"]["imap_error"] and body["test"]["ok"] is False
    assert len(_audit(console, "account.test")) == 2
    otto = console.client().post(
        f"/api/v1{target}",
        headers={"Authorization": f"Bearer {users.issue_api_token(console.engine, 'otto', actor=CLI)}"},
    )
    assert otto.status_code == 403 and len(_audit(console, "account.test")) == 2


def test_enable_disable_and_fetch_now_are_audited_with_before_and_after(setup: tuple[Console, str]) -> None:
    console, _ = setup
    record_refusal(console, OAUTH2_ACCOUNT)
    ann, csrf = console.session("ann")
    form = {"csrf_token": csrf}
    origin = {"Origin": BASE}
    assert "refuses the sign-in" in ann.get("/").text

    answer = ann.post(f"{ALICE_PAGE}/disable", data=form, headers=origin)
    assert answer.status_code == 200 and f"{OAUTH2_ACCOUNT} is disabled." in answer.text
    assert not _enabled(console)
    assert "refuses the sign-in" not in ann.get("/").text  # nobody signs in to a disabled account
    (entry,) = _audit(console, "account.disable")
    assert (entry.actor, entry.target, entry.before, entry.after) == (
        "ann",
        OAUTH2_ACCOUNT,
        {"enabled": True},
        {"enabled": False},
    )
    token = users.issue_api_token(console.engine, "ann", actor=CLI)
    api = console.client().post(f"/api/v1{ALICE_PAGE}/enable", headers={"Authorization": f"Bearer {token}"})
    assert (
        api.status_code == 200 and api.json()["done"] == f"{OAUTH2_ACCOUNT} is enabled." and _enabled(console)
    )
    assert [e.after for e in _audit(console, "account.enable")] == [{"enabled": True}]

    # The EMAIL_* account is changed in its settings, not here.
    answer = ann.post(f"/accounts/{PASSWORD_ACCOUNT}/disable", data=form, headers=origin)
    assert answer.status_code == 400 and "defined by the EMAIL_* settings" in answer.text

    # Fetch now: each of the account's folders in the index, as the overview's button.
    answer = ann.post(f"{ALICE_PAGE}/fetch", data=form, headers=origin)
    assert answer.status_code == 404 and "No folder of alice-oauth is in the index yet" in answer.text
    with console.engine.begin() as conn:
        ensure_folder(conn, ACCOUNT, "INBOX")
    answer = ann.post(f"{ALICE_PAGE}/fetch", data=form, headers=origin)
    assert answer.status_code == 200 and "Fetch of INBOX asked" in answer.text
    with reading(console.engine) as conn:
        asked = conn.execute(
            select(folders.c.fetch_requested_at).where(folders.c.account == ACCOUNT)
        ).scalar_one()
    assert asked is not None
    assert [(e.actor, e.target) for e in _audit(console, "accounts.fetch_now")] == [
        ("ann", f"{ACCOUNT}/INBOX")
    ]


def _authorize(location: str, username: str) -> str:
    """The person at the authorization server: its sign-in page, then "Allow" as ``username``;
    the address it sends the browser back to."""
    page = requests.get(location, timeout=10)
    assert page.status_code == 200 and "Allow" in page.text
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text))
    import html

    form = {key: html.unescape(value) for key, value in fields.items()} | {"username": username}
    answer = requests.post(location.split("?")[0], data=form, timeout=10, allow_redirects=False)
    assert answer.status_code == 303, answer.text
    return answer.headers["location"]


def test_reconnect_runs_the_code_flow_with_pkce_and_the_account_signs_in_again(
    setup: tuple[Console, str],
    auth_server: LocalOAuth2Server,  # noqa: F811
) -> None:
    console, _ = setup
    record_refusal(console, OAUTH2_ACCOUNT)
    ann, _ = console.session("ann")
    start = ann.get(f"{ALICE_PAGE}/reconnect")
    assert start.status_code == 303
    location = start.headers["location"]
    query = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
    assert location.startswith(auth_server.authorize_url + "?") and CLIENT_SECRET not in location
    assert (query["response_type"], query["client_id"], query["code_challenge_method"]) == (
        "code",
        CLIENT_ID,
        "S256",
    )
    assert query["redirect_uri"] == f"{BASE}/oauth2/callback" and len(query["state"]) >= 43
    cookie = start.headers["set-cookie"]
    assert (
        f"emailops_reconnect={query['state']}" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    )

    back = _authorize(location, ALICE)
    assert back.startswith(f"{BASE}/oauth2/callback?")
    # The redirect back is a cross-site navigation: no session cookie, only the flow's.
    browser = console.client()
    forged = browser.get(back)  # without the cookie of the browser that started it
    assert forged.status_code == 400 and "not started in this browser" in forged.text
    assert _audit(console, "account.oauth_reconnect") == []
    browser.cookies.set("emailops_reconnect", query["state"])
    done = browser.get(back)
    assert done.status_code == 200 and f"Reconnected {OAUTH2_ACCOUNT}" in done.text
    assert f'href="{BASE}{ALICE_PAGE}"' in done.text
    (entry,) = _audit(console, "account.oauth_reconnect")
    assert (entry.actor, entry.role, entry.target) == ("ann", "admin", OAUTH2_ACCOUNT)
    assert (entry.before, entry.after) == ({"state": "auth_failed"}, {"state": "ok"})
    with reading(console.engine) as conn:
        state = read_state(conn, ACCOUNT)
    assert state is not None and state.state.value == "ok"
    assert "refuses the sign-in" not in ann.get("/").text
    # The stored grant signs in to Dovecot (XOAUTH2 with an access token it issues).
    _, result = try_sign_in(console.settings, console.engine, OAUTH2_ACCOUNT)
    assert result.imap_error is None and "INBOX" in result.imap_folders
    assert auth_server.count("token:authorization_code") == 1
    # A callback is taken once.
    again = browser.get(back)
    assert again.status_code == 400 and "unknown, used or expired" in again.text
    assert len(_audit(console, "account.oauth_reconnect")) == 1


def test_a_refused_authorization_is_shown_and_audited(
    setup: tuple[Console, str],
) -> None:
    console, _ = setup
    ann, _ = console.session("ann")
    start = ann.get(f"{ALICE_PAGE}/reconnect")
    state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
    browser = console.client()
    browser.cookies.set("emailops_reconnect", state)
    answer = browser.get(
        f"/oauth2/callback?state={state}&error=access_denied&error_description=the+user+declined"
    )
    assert answer.status_code == 502 and "access_denied: the user declined" in answer.text
    (entry,) = _audit(console, "account.oauth_reconnect")
    assert entry.after == {
        "ok": False,
        "error": "the authorization server answered access_denied: the user declined",
    }


def test_the_test_authorization_server_requires_pkce_s256(
    auth_server: LocalOAuth2Server,  # noqa: F811
) -> None:
    base = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": "http://127.0.0.1:9/cb",
        "state": "s",
    }
    plain = requests.get(auth_server.authorize_url, params=base, timeout=10)
    assert plain.status_code == 400 and "PKCE" in plain.text
    verifier = "v" * 50
    location = (
        auth_server.authorize_url
        + "?"
        + requests.compat.urlencode(
            base | {"code_challenge": s256(verifier), "code_challenge_method": "S256"}
        )
    )
    back = parse_qs(urlsplit(_authorize(location, ALICE)).query)
    endpoint = TokenEndpoint(oauth2_config(auth_server))
    with pytest.raises(OAuth2RefusedError, match="PKCE: the code_verifier does not match"):
        endpoint.authorization_code(back["code"][0], base["redirect_uri"], "w" * 50)
    with pytest.raises(OAuth2RefusedError, match="unknown, used or expired"):  # once, even when refused
        endpoint.authorization_code(back["code"][0], base["redirect_uri"], verifier)
    back = parse_qs(urlsplit(_authorize(location, ALICE)).query)
    tokens = endpoint.authorization_code(back["code"][0], base["redirect_uri"], verifier)
    assert tokens.refresh_token is not None and auth_server.refresh_token_valid(tokens.refresh_token)
