"""Single sign-on of the console through a real OpenID Connect provider on loopback (localmail):
discovery, PKCE, the id_token's signature, issuer, audience, expiry and nonce; roles from groups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from emailops.audit import list_entries
from emailops.store.database import reading
from emailops.store.schema import users
from emailops.users import accounts
from emailops.users.oidc_accounts import OIDC_PASSWORD_HASH
from localmail.oidc_provider import LocalOidcProvider, Tamper
from prod.console.pages.oidc_sign_in import NO_ROLE
from prod.console.pages.sign_in import PASSWORD_OFF
from prod.runtime_settings import ConfigError, RuntimeSettings
from tests.console_helpers import BASE, CLI, Console, MovingClock, add_users, console_settings, sign_in
from tests.index_helpers import index_engine
from tests.test_console_browser import Page, browser, serving  # noqa: F401 (browser: a fixture)

pytestmark = pytest.mark.timeout(120)
CLIENT_ID = "emailops-console"
CLIENT_SECRET = "console-secret-Hq47"
ROLE_MAP = "emailops-admins=admin,support=operator,staff=viewer"


@pytest.fixture
def provider() -> Iterator[LocalOidcProvider]:
    with LocalOidcProvider(clients={CLIENT_ID: CLIENT_SECRET}) as running:
        yield running


@pytest.fixture
def engine(db_url: str) -> Engine:
    engine = index_engine(db_url)
    add_users(engine)
    return engine


def _console(tmp_path: Path, db_url: str, engine: Engine, issuer: str, **overrides: Any) -> Console:
    settings = console_settings(
        tmp_path,
        db_url,
        web_oidc_issuer=issuer,
        web_oidc_client_id=CLIENT_ID,
        web_oidc_client_secret=CLIENT_SECRET,
        web_oidc_role_map=ROLE_MAP,
        **overrides,
    )
    return Console(settings, engine, MovingClock())


@pytest.fixture
def console(tmp_path: Path, db_url: str, engine: Engine, provider: LocalOidcProvider) -> Console:
    return _console(tmp_path, db_url, engine, provider.issuer)


def _sso(client: TestClient, next_path: str = "/") -> Any:
    """Through the provider and back: the console's answer to the callback."""
    started = client.get("/sign-in/oidc", params={"next": next_path})
    assert started.status_code == 303, started.text
    sent_to = started.headers["location"]
    query = parse_qs(urlsplit(sent_to).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"] and query["state"]
    back = requests.get(sent_to, allow_redirects=False, timeout=10)
    assert back.status_code == 302, back.text
    location = urlsplit(back.headers["location"])
    assert f"{location.scheme}://{location.netloc}" == BASE
    return client.get(f"{location.path}?{location.query}")


def _failures(engine: Engine) -> list[Any]:
    with reading(engine) as conn:
        return [entry.after for entry in list_entries(conn, actions=["sign_in.failure"])]


@pytest.mark.parametrize(
    ("groups", "role"),
    [
        (["staff"], "viewer"),
        (["staff", "support"], "operator"),
        (["other", "emailops-admins", "staff"], "admin"),
    ],
)
def test_a_group_gives_its_highest_role_and_a_console_session(
    console: Console, provider: LocalOidcProvider, engine: Engine, groups: list[str], role: str
) -> None:
    provider.user = {"preferred_username": "carol@example.org", "groups": groups}
    client = console.client()
    answer = _sso(client, "/audit")
    assert answer.status_code == 200, answer.text
    assert 'content="0;url=http://testserver/audit"' in answer.text
    assert "emailops_oidc" not in client.cookies
    overview = client.get("/api/v1/overview")
    assert overview.status_code == 200, overview.text
    with reading(engine) as conn:
        row = conn.execute(select(users).where(users.c.name == "carol@example.org")).one()
        entries = list_entries(conn, actions=["sign_in.success", "user.add"], actor="carol@example.org")
    assert row.role == role and row.password_hash == OIDC_PASSWORD_HASH
    assert [(entry.action, entry.actor, entry.role) for entry in entries] == [
        ("sign_in.success", "carol@example.org", role),
        ("user.add", "carol@example.org", role),
    ]
    assert entries[0].after == {"via": "oidc", "role": role}


def test_the_role_is_evaluated_again_at_every_sign_in(
    console: Console, provider: LocalOidcProvider, engine: Engine
) -> None:
    provider.user = {"preferred_username": "dave", "groups": ["emailops-admins"]}
    assert _sso(console.client()).status_code == 200
    provider.user = {"preferred_username": "dave", "groups": ["staff"]}
    client = console.client()
    assert _sso(client).status_code == 200
    with reading(engine) as conn:
        role = conn.execute(select(users.c.role).where(users.c.name == "dave")).scalar_one()
        changes = [entry.after for entry in list_entries(conn, actions=["user.role"])]
    assert role == "viewer" and changes == [{"role": "viewer"}]
    assert client.get("/audit").status_code == 403


def test_no_mapped_group_is_refused_with_a_page_and_audited(
    console: Console, provider: LocalOidcProvider, engine: Engine
) -> None:
    provider.user = {"preferred_username": "eve", "groups": ["marketing"]}
    client = console.client()
    answer = _sso(client)
    assert answer.status_code == 403 and NO_ROLE in answer.text
    assert "emailops_session" not in client.cookies
    assert _failures(engine) == [{"via": "oidc", "reason": "no group maps to a role"}]
    with reading(engine) as conn:
        assert conn.execute(select(users).where(users.c.name == "eve")).first() is None


@pytest.mark.parametrize("tamper", ["foreign_key", "nonce", "audience", "expired", "issuer"])
def test_a_bad_id_token_is_refused_and_audited(
    console: Console, provider: LocalOidcProvider, engine: Engine, tamper: Tamper
) -> None:
    provider.user = {"preferred_username": "mallory", "groups": ["emailops-admins"]}
    provider.tamper = tamper
    client = console.client()
    answer = _sso(client)
    assert answer.status_code == 403, answer.text
    assert "emailops_session" not in client.cookies
    [failure] = _failures(engine)
    assert failure["via"] == "oidc" and failure["reason"].startswith("the id_token was refused")
    with reading(engine) as conn:
        assert conn.execute(select(users).where(users.c.name == "mallory")).first() is None


def test_a_wrong_or_replayed_state_is_refused(
    console: Console, provider: LocalOidcProvider, engine: Engine
) -> None:
    provider.user = {"preferred_username": "frank", "groups": ["staff"]}
    victim = console.client()
    started = victim.get("/sign-in/oidc")
    back = urlsplit(
        requests.get(started.headers["location"], allow_redirects=False, timeout=10).headers["location"]
    )
    callback = f"{back.path}?{back.query}"
    # Another browser (login CSRF: the attacker's code in the victim's browser) has no matching cookie.
    assert console.client().get(callback).status_code == 403
    state = parse_qs(back.query)["state"][0]
    # One character changed (a state drawn with "x" first would otherwise be "forged" into itself).
    other_state = ("y" if state.startswith("x") else "x") + state[1:]
    forged = callback.replace(state, other_state)
    victim.cookies.set("emailops_oidc", other_state)
    assert victim.get(forged).status_code == 403
    victim.cookies.set("emailops_oidc", state)
    assert victim.get(callback).status_code == 200
    # The same callback again: the sign-in it finished is gone.
    victim.cookies.set("emailops_oidc", state)
    assert victim.get(callback).status_code == 403
    reasons = [failure["reason"] for failure in _failures(engine)]
    assert reasons == [
        "sign-in unknown, used or expired",
        "sign-in unknown, used or expired",
        "state does not match this browser's sign-in",
    ]


def test_a_password_user_is_not_taken_over(
    console: Console, provider: LocalOidcProvider, engine: Engine
) -> None:
    provider.user = {"preferred_username": "ann", "groups": ["emailops-admins"]}
    assert _sso(console.client()).status_code == 403
    [failure] = _failures(engine)
    assert "signs in with a password" in failure["reason"]


def test_a_disabled_oidc_user_is_refused(
    console: Console, provider: LocalOidcProvider, engine: Engine
) -> None:
    provider.user = {"preferred_username": "ivan", "groups": ["staff"]}
    assert _sso(console.client()).status_code == 200
    accounts.disable_user(engine, "ivan", actor=CLI)
    client = console.client()
    assert _sso(client).status_code == 403
    assert "emailops_session" not in client.cookies
    assert _failures(engine) == [{"via": "oidc", "reason": "user 'ivan' is disabled"}]


def test_password_login_false_hides_and_refuses_the_form(
    tmp_path: Path, db_url: str, engine: Engine, provider: LocalOidcProvider
) -> None:
    both = _console(tmp_path, db_url, engine, provider.issuer)
    page = both.client().get("/sign-in").text
    assert 'name="password"' in page and "/sign-in/oidc" in page
    sso_only = _console(tmp_path, db_url, engine, provider.issuer, web_password_login=False)
    client = sso_only.client()
    page = client.get("/sign-in").text
    assert 'name="password"' not in page and "/sign-in/oidc" in page
    client.get("/sign-in")
    refused = client.post(
        "/sign-in",
        data={"username": "ann", "password": "ann's long admin pass phrase", "next": "/"},
        headers={"Origin": BASE},
    )
    assert refused.status_code == 403 and PASSWORD_OFF in refused.text
    assert "emailops_session" not in client.cookies
    assert _failures(engine) == [{"reason": "password sign-in is off"}]
    # The same password is accepted where password sign-in is on: the refusal was the setting's.
    assert sign_in(both.client(), "ann", "ann's long admin pass phrase").status_code == 303


def test_an_oidc_user_has_no_password(console: Console, provider: LocalOidcProvider) -> None:
    provider.user = {"preferred_username": "gina", "groups": ["staff"]}
    assert _sso(console.client()).status_code == 200
    assert sign_in(console.client(), "gina", OIDC_PASSWORD_HASH).status_code == 401


def test_without_an_issuer_single_sign_on_is_absent(tmp_path: Path, db_url: str, engine: Engine) -> None:
    console = Console(console_settings(tmp_path, db_url), engine, MovingClock())
    client = console.client()
    assert "/sign-in/oidc" not in client.get("/sign-in").text
    assert client.get("/sign-in/oidc").status_code == 404


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"web_oidc_issuer": "https://idp.example.org"}, "WEB_OIDC_CLIENT_ID"),
        ({"web_oidc_issuer": "https://idp.example.org", "web_oidc_client_id": "c"}, "WEB_OIDC_ROLE_MAP"),
        ({"web_oidc_role_map": "admins=root"}, "WEB_OIDC_ROLE_MAP"),
        ({"web_oidc_role_map": "admins"}, "WEB_OIDC_ROLE_MAP"),
        ({"web_oidc_issuer": "http://idp.example.org"}, "WEB_OIDC_ISSUER"),
        ({"web_password_login": False}, "WEB_PASSWORD_LOGIN"),
    ],
)
def test_bad_single_sign_on_settings_stop_start_up_naming_the_variable(
    overrides: dict[str, Any], named: str
) -> None:
    base = {
        "email_imap_host": "h",
        "email_imap_port": 993,
        "email_smtp_host": "h",
        "email_smtp_port": 465,
        "email_username": "u",
        "email_password": "p",
        "web_oidc_client_secret": "never-shown-Jk38",
    }
    with pytest.raises(ConfigError, match=named) as raised:
        RuntimeSettings.from_env(_env_file=None, **base, **overrides)
    assert "never-shown-Jk38" not in str(raised.value)


def test_the_client_secret_is_masked() -> None:
    settings = RuntimeSettings.from_env(
        _env_file=None,
        email_imap_host="h",
        email_imap_port=993,
        email_smtp_host="h",
        email_smtp_port=465,
        email_username="u",
        email_password="p",
        web_oidc_issuer="https://idp.example.org",
        web_oidc_client_id="c",
        web_oidc_client_secret="never-shown-Jk38",
        web_oidc_role_map=ROLE_MAP,
    )
    assert "never-shown-Jk38" not in repr(settings.masked()) + repr(settings) + repr(settings.oidc_config())
    config = settings.oidc_config()
    assert config is not None and config.client_secret == "never-shown-Jk38"


def test_a_browser_signs_in_through_the_provider(
    tmp_path: Path,
    provider: LocalOidcProvider,
    browser: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    db_url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    console = _console(tmp_path, db_url, index_engine(db_url), provider.issuer, web_password_login=False)
    provider.user = {"preferred_username": "hana", "groups": ["emailops-admins"]}
    with serving(console) as base:
        tab = Page(browser, base)
        tab.page.goto(base + "/audit")
        assert tab.page.get_by_label("Password").count() == 0
        tab.page.get_by_role("link", name="Sign in with single sign-on").click()
        tab.page.get_by_role("button", name="Sign out").wait_for()
        assert tab.page.url == base + "/audit"
        assert tab.page.get_by_role("heading", level=1).inner_text() == "Audit log"
        assert tab.violations == []
