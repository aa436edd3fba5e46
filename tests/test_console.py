"""The operator console in-process: every route and role, CSRF, sessions, sign-in throttle, headers,
secrets, audit, and the Users page's actions; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from argon2 import PasswordHasher
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, select

from emailops.audit import list_entries
from emailops.store.database import reading
from emailops.store.folders import ensure_folder, touch_sync
from emailops.store.schema import console_sessions, users
from emailops.users import accounts, credentials
from emailops.users.permissions import PERMISSIONS, Action, Role
from prod.console.app import ROUTE_TABLE
from prod.console.calls import Access, ConsoleRoute
from prod.console.guard import BAD_CSRF_TOKEN, FORBIDDEN, FOREIGN_ORIGIN
from prod.console.metrics import HttpMetrics
from tests.console_helpers import (
    BASE,
    CLI,
    PASSWORDS,
    SECRETS,
    Console,
    MovingClock,
    add_failed_model_job,
    add_unknown_reply_and_quarantined_message,
    add_users,
    console_settings,
    sign_in,
)
from tests.index_helpers import index_engine

pytestmark = pytest.mark.timeout(240)
ROLE_OF = {None: None, "vic": Role.VIEWER, "otto": Role.OPERATOR, "ann": Role.ADMIN}


@pytest.fixture
def engine(db_url: str) -> Engine:
    engine = index_engine(db_url)
    add_users(engine)
    return engine


@pytest.fixture
def console(tmp_path: Path, db_url: str, engine: Engine) -> Console:
    return Console(console_settings(tmp_path, db_url), engine, MovingClock())


def _concrete(path: str) -> str:
    path = path.replace("{name}", "nobody").replace("{id:int}", "0").replace("{stage}", "rules")
    return path.replace("{n:int}", "0")


def _call(console: Console, route: ConsoleRoute, method: str, user: str | None) -> Any:
    if user is None:
        client, csrf = console.client(), ""
    else:
        client, csrf = console.session(user)
    if method == "GET":
        return client.get(_concrete(route.path))
    return client.post(_concrete(route.path), data={"csrf_token": csrf}, headers={"Origin": BASE})


def _refused(answer: Any, user: str | None) -> bool:
    if user is None:
        redirected = answer.status_code == 303 and answer.headers["location"].startswith("/sign-in?next=")
        return redirected or answer.status_code == 401
    return answer.status_code == 403 and FORBIDDEN in answer.text


def test_every_route_admits_exactly_the_roles_of_its_permission(console: Console) -> None:
    checked = 0
    for route in ROUTE_TABLE:
        for method in route.methods:
            for user, role in ROLE_OF.items():
                if route.permission is Access.PUBLIC:
                    expected = True
                elif role is None:
                    expected = False
                elif route.permission is Access.SIGNED_IN:
                    expected = True
                else:
                    expected = Action(route.permission) in PERMISSIONS[role]
                answer = _call(console, route, method, user)
                assert _refused(answer, user) is not expected, (method, route.path, user, answer.text)
                checked += 1
    assert checked >= 4 * 18
    # The API answers for the page it stands beside, with the same permission.
    pages = {r.path: r.permission for r in ROUTE_TABLE if r.nav}
    apis = {r.path: r.permission for r in ROUTE_TABLE if r.is_api}
    # /api/v1/accounts is the overview's list of accounts and their folders (viewers read it);
    # the admin's Accounts page stands beside /api/v1/accounts/{name}.
    stand_ins = {"/": "/api/v1/overview", "/accounts": "/api/v1/accounts/{name}"}
    for path, permission in pages.items():
        api = stand_ins.get(path, f"/api/v1{path}")
        assert apis[api] == permission


def test_the_navigation_shows_a_role_only_what_it_may_open(console: Console) -> None:
    links = {}
    for user in ("vic", "otto", "ann"):
        client, _ = console.session(user)
        links[user] = re.findall(r'<li><a href="([^"]+)"', client.get("/settings").text)
    expected = ["/", "/messages", "/outbox", "/quarantine", "/drafts", "/rules"]
    assert links["vic"] == links["otto"] == [*expected, "/settings"]
    assert links["ann"] == [*expected, "/accounts", "/users", "/audit", "/settings"]


def test_unsafe_requests_need_the_session_token_and_the_console_origin(console: Console) -> None:
    client, csrf = console.session("ann")
    target = "/users/vic/disable"

    def disabled() -> bool:
        with reading(console.engine) as conn:
            user = accounts.get_user(conn, "vic")
        assert user is not None
        return user.disabled

    refused = [
        ({}, {"Origin": BASE}, BAD_CSRF_TOKEN),
        ({"csrf_token": "x" * 43}, {"Origin": BASE}, BAD_CSRF_TOKEN),
        ({"csrf_token": csrf}, {"Origin": "https://evil.example"}, FOREIGN_ORIGIN),
        ({"csrf_token": csrf}, {"Origin": "null"}, FOREIGN_ORIGIN),
        ({"csrf_token": csrf}, {"Referer": "https://evil.example/page"}, FOREIGN_ORIGIN),
        ({"csrf_token": csrf}, {}, FOREIGN_ORIGIN),
    ]
    for form, headers, message in refused:
        answer = client.post(target, data=form, headers=headers)
        assert (answer.status_code, message in answer.text) == (403, True), (form, headers)
    assert not disabled()

    assert client.post(target, data={}, headers={"Origin": BASE, "X-CSRF-Token": csrf}).status_code == 200
    assert disabled()
    answer = client.post("/users/vic/enable", data={"csrf_token": csrf}, headers={"Referer": f"{BASE}/users"})
    assert answer.status_code == 200 and not disabled()

    # An API token needs no CSRF token; a browser's foreign Origin is refused all the same.
    token = accounts.issue_api_token(console.engine, "ann", actor=CLI)
    api = console.client()
    bearer = {"Authorization": f"Bearer {token}"}
    answer = api.post(target, headers=bearer)
    assert answer.status_code == 200 and answer.json()["id"] == "vic" and disabled()
    answer = api.post("/users/vic/enable", headers={**bearer, "Origin": "https://evil.example"})
    assert answer.status_code == 403 and disabled()
    assert api.get("/api/v1/users", headers={"Authorization": "Bearer eo_wrong"}).status_code == 401


def test_a_session_ends_after_its_idle_and_its_absolute_limit(console: Console) -> None:
    client, _ = console.session("vic")
    assert client.get("/").status_code == 200
    console.clock.advance(minutes=29)
    assert client.get("/").status_code == 200  # the idle time starts again at each request
    console.clock.advance(minutes=29)
    assert client.get("/").status_code == 200
    console.clock.advance(minutes=30, seconds=1)
    assert client.get("/").status_code == 303
    with reading(console.engine) as conn:
        assert conn.execute(select(console_sessions)).all() == []

    client, _ = console.session("vic")
    started = console.clock.now
    while client.get("/").status_code == 200:  # a request every 20 min: never idle, but old
        console.clock.advance(minutes=20)
    assert timedelta(hours=12) < console.clock.now - started <= timedelta(hours=12, minutes=20)


def test_requests_within_a_minute_of_the_last_recorded_one_write_nothing(console: Console) -> None:
    client, _ = console.session("vic")

    def last_seen() -> object:
        with reading(console.engine) as conn:
            return conn.execute(select(console_sessions.c.last_seen_at)).scalar_one()

    started = last_seen()
    console.clock.advance(seconds=59)
    assert client.get("/").status_code == 200
    assert last_seen() == started  # read only: no write lock taken from the daemon's indexing
    console.clock.advance(seconds=1)
    assert client.get("/").status_code == 200
    assert last_seen() == console.clock.now


def test_sign_in_rotates_the_session_and_sign_out_ends_it_all_audited(console: Console) -> None:
    client = console.client()
    client.cookies.set("emailops_session", "planted-by-someone-else")
    answer = sign_in(client, "otto", PASSWORDS["otto"])
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    found = re.search(r"emailops_session=([^;]+)", cookie)
    assert found is not None
    session_id = found[1]
    assert session_id != "planted-by-someone-else" and len(session_id) >= 43
    client.cookies.clear()
    client.cookies.set("emailops_session", session_id)
    with reading(console.engine) as conn:
        stored = conn.execute(select(console_sessions.c.id_hash)).scalars().all()
    assert stored == [credentials.token_digest(session_id)]  # only its digest

    page = client.get("/")
    assert page.status_code == 200 and "otto (operator)" in page.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    assert f'"X-CSRF-Token": "{csrf[1]}"' in page.text  # htmx sends it with each request
    answer = client.post("/sign-out", data={"csrf_token": csrf[1]}, headers={"Origin": BASE})
    assert answer.status_code == 303
    client.cookies.clear()
    client.cookies.set("emailops_session", session_id)
    assert client.get("/").status_code == 303  # the old id signs nobody in

    with reading(console.engine) as conn:
        actions = [(e.action, e.actor, e.source) for e in list_entries(conn, actor="otto")]
    assert actions == [("sign_out", "otto", "198.51.100.1"), ("sign_in.success", "otto", "198.51.100.1")]


def test_https_base_url_marks_the_cookie_secure_and_sets_the_links(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    settings = console_settings(tmp_path, db_url, web_base_url="https://ops.example.org")
    console = Console(settings, engine, MovingClock())
    client = console.client()
    client.base_url = "https://ops.example.org"  # type: ignore[assignment]
    answer = client.get("/sign-in")
    assert (
        "Secure" in answer.headers["set-cookie"] and "__Host-emailops_sign_in" in answer.headers["set-cookie"]
    )
    assert answer.headers["strict-transport-security"].startswith("max-age=")
    session_id = console.session("vic")[0].cookies["emailops_session"]
    client.cookies.set("__Host-emailops_session", session_id)
    data = client.get("/api/v1/settings").json()
    assert data["url"] == "https://ops.example.org/settings"
    assert client.get("/users").status_code == 403
    assert client.get("/", headers={"Host": "rebound.example"}).status_code == 400


def _attempts(console: Console, source: str, name: str, password: str, count: int) -> list[tuple[int, str]]:
    client = console.client(source)
    answers = []
    for _ in range(count):
        answer = sign_in(client, name, password)
        text = re.sub(r'value="[^"]+"', 'value=""', answer.text)
        answers.append((answer.status_code, text))
    return answers


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__()
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified += 1
        return super().verify(hash, password)


def test_failed_sign_ins_lock_a_name_known_or_not_alike_until_an_admin_lifts_it(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    hasher = CountingHasher()
    monkeypatch.setattr(credentials, "HASHER", hasher)
    known = _attempts(console, "203.0.113.1", "vic", "not vic's password at all", 20)
    assert hasher.verified == 20
    unknown = _attempts(console, "203.0.113.2", "nobody-here", "not anyone's password", 20)
    assert hasher.verified == 40  # a dummy hash for the unknown name: the same work, the same time
    assert known == unknown
    assert {status for status, _ in known} == {401}
    assert "Wrong username or password." in known[0][1]

    # Locked: even the right password gets 429, from any address, without a password check.
    after = _attempts(console, "203.0.113.3", "vic", PASSWORDS["vic"], 1)
    assert after == _attempts(console, "203.0.113.4", "nobody-here", "whatever it is", 1)
    assert after[0][0] == 429 and "Too many failed sign-ins" in after[0][1]
    assert hasher.verified == 40

    admin, csrf = console.session("ann")
    page = admin.get("/users").text
    assert "Lift lockout of vic" in page and "Lift lockout of nobody-here" in page
    answer = admin.post("/users/vic/unlock", data={"csrf_token": csrf}, headers={"Origin": BASE})
    assert answer.status_code == 200 and "Lockout of vic lifted." in answer.text
    assert sign_in(console.client("203.0.113.5"), "vic", PASSWORDS["vic"]).status_code == 303

    with reading(console.engine) as conn:
        entries = list_entries(conn, limit=1000)
    actions = [(e.action, e.target) for e in entries]
    assert actions.count(("sign_in.failure", "vic")) == 21
    assert ("sign_in.lockout", "vic") in actions and ("sign_in.lockout", "nobody-here") in actions
    assert ("sign_in.unlock", "vic") in actions and ("sign_in.success", "vic") in actions
    assert [e.actor for e in entries if e.action == "sign_in.unlock"] == ["ann"]


def test_one_address_with_many_failures_is_throttled_for_every_name(console: Console) -> None:
    client = console.client("203.0.113.9")
    for n in range(20):
        assert sign_in(client, f"guess{n}", "some wrong password").status_code == 401
    answer = sign_in(client, "ann", PASSWORDS["ann"])
    assert answer.status_code == 429 and answer.headers["retry-after"] == "900"
    assert sign_in(console.client("203.0.113.10"), "ann", PASSWORDS["ann"]).status_code == 303
    console.clock.advance(minutes=15, seconds=1)
    assert sign_in(client, "ann", PASSWORDS["ann"]).status_code == 303


def _get_routes() -> list[ConsoleRoute]:
    return [r for r in ROUTE_TABLE if "GET" in r.methods and "{" not in r.path]


def test_every_answer_carries_the_security_headers_and_a_request_id(console: Console) -> None:
    admin, csrf = console.session("ann")
    answers = [admin.get(r.path) for r in _get_routes()]
    answers += [console.client().get(r.path) for r in _get_routes()]
    answers += [
        admin.get("/no/such/page"),
        admin.get("/static/console.css"),
        admin.post("/users/nobody/disable", data={"csrf_token": csrf}, headers={"Origin": BASE}),
        admin.post("/users/nobody/disable", data={}, headers={"Origin": BASE}),
    ]
    ids = set()
    for answer in answers:
        headers = answer.headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
        assert headers["x-frame-options"] == "DENY"
        static = answer.url.path.startswith("/static/")
        assert (headers["cache-control"] == "no-store") is not static
        ids.add(headers["x-request-id"])
    assert len(ids) == len(answers)


def test_no_answer_ever_shows_a_secret(console: Console) -> None:
    admin, _ = console.session("ann")
    token = accounts.issue_api_token(console.engine, "vic", actor=CLI)
    sessions = [console.session(name)[0].cookies["emailops_session"] for name in ("vic", "otto")]
    with reading(console.engine) as conn:
        stored = [
            value for row in conn.execute(select(users.c.password_hash, users.c.token_hash)) for value in row
        ]
    secrets = [*SECRETS.values(), "sentrykey-Yx55", "llmpass-Kk39", *PASSWORDS.values(), token, *sessions]
    secrets += [value for value in stored if value]
    # Something in every table the pages show.
    sign_in(console.client("192.0.2.50"), "vic", "a wrong password, typed once")
    bodies = []
    for client in (admin, console.client()):
        for route in _get_routes():
            answer = client.get(route.path)
            bodies.append(answer.text + json.dumps(dict(answer.headers)))
    assert any("EMAIL_PASSWORD" in body for body in bodies)  # the settings page was crawled
    assert any("sign_in.failure" in body for body in bodies)  # and the audit log
    for secret in secrets:
        assert not [body for body in bodies if secret in body], secret


def test_every_json_object_has_an_id_and_the_address_of_its_page(console: Console) -> None:
    with console.engine.begin() as conn:
        folder = ensure_folder(conn, "bob@example.test@127.0.0.1", "INBOX")
        touch_sync(conn, folder.id, console.clock())
    add_unknown_reply_and_quarantined_message(console.engine)
    add_failed_model_job(console.engine)
    console.settings.rules_file.write_text(
        '[[rules]]\nname = "all"\n[rules.actions]\nflag = true\n', encoding="utf-8"
    )
    admin, _ = console.session("ann")
    overview = admin.get("/").text
    assert "INBOX" in overview and "2026-05-01 09:00:00" in overview
    apis = [r.path for r in _get_routes() if r.is_api]
    assert len(apis) == 10
    for path in apis:
        data = admin.get(path).json()
        assert set(data) >= {"id", "url"} and data["url"].startswith(BASE + "/")
        items = [item for value in data.values() if isinstance(value, list) for item in value]
        assert items, path
        page = urlsplit(data["url"])
        for item in items:
            if isinstance(item, dict):
                # Under its page's address, or a part of its page; keeping the account shown.
                own = urlsplit(item["url"])
                assert own.path.startswith(page.path.rstrip("/") + "/") or (
                    own.path == page.path and own.fragment
                ), item
                assert own.query in (page.query, ""), item
                assert "id" in item


def test_users_are_managed_from_the_page_secrets_shown_once_every_change_audited(console: Console) -> None:
    admin, csrf = console.session("ann")
    origin = {"Origin": BASE}
    answer = admin.post("/users", data={"csrf_token": csrf, "name": "nina", "role": "viewer"}, headers=origin)
    assert answer.status_code == 200
    shown = re.search(r"password: <code>([^<]+)</code>", answer.text)
    assert shown is not None
    assert accounts.verify_sign_in(console.engine, "nina", shown[1]) is not None
    answer = admin.post("/users", data={"csrf_token": csrf, "name": "nina", "role": "viewer"}, headers=origin)
    assert answer.status_code == 400 and "exists already" in answer.text

    answer = admin.post("/users/nina/token", data={"csrf_token": csrf}, headers=origin)
    token = re.search(r"<code>(eo_[^<]+)</code>", answer.text)
    assert token is not None
    assert accounts.verify_api_token(console.engine, token[1]) is not None
    answer = admin.post("/users/nina/password", data={"csrf_token": csrf}, headers=origin)
    new = re.search(r"password: <code>([^<]+)</code>", answer.text)
    assert new is not None and new[1] != shown[1]
    assert accounts.verify_sign_in(console.engine, "nina", new[1]) is not None
    later = admin.get("/users").text
    assert shown[1] not in later and token[1] not in later and new[1] not in later

    nina, _ = console.session("nina")
    assert nina.get("/").status_code == 200
    assert admin.post("/users/nina/disable", data={"csrf_token": csrf}, headers=origin).status_code == 200
    assert nina.get("/").status_code == 303  # disabling ends the user's sessions
    assert admin.post("/users/nina/remove", data={"csrf_token": csrf}, headers=origin).status_code == 200
    assert "user-nina" not in admin.get("/users").text

    audit = admin.get("/api/v1/audit", params={"actor": "ann"}).json()["entries"]
    assert [(e["action"], e["target"], e["source"]) for e in audit] == [
        ("user.remove", "nina", "198.51.100.1"),
        ("user.disable", "nina", "198.51.100.1"),
        ("user.passwd", "nina", "198.51.100.1"),
        ("user.token", "nina", "198.51.100.1"),
        ("user.add", "nina", "198.51.100.1"),
    ]
    page = admin.get("/audit", params={"action": "user.token", "since": "24h"})
    assert page.status_code == 200 and "user.token" in page.text and "user.passwd" not in page.text
    assert admin.get("/audit", params={"since": "yesterday"}).status_code == 400


def test_request_metrics_count_by_route_template_method_and_status(console: Console) -> None:
    registry = CollectorRegistry()
    console = Console(
        console.settings, console.engine, console.clock, HttpMetrics(enabled=True, registry=registry)
    )
    admin, csrf = console.session("ann")
    admin.get("/users")
    admin.post("/users/nobody/disable", data={"csrf_token": csrf}, headers={"Origin": BASE})
    console.client().get("/users")
    console.client().request("BREW", "/users")

    def count(route: str, method: str, status: str) -> float | None:
        return registry.get_sample_value(
            "emailops_http_requests_total", {"route": route, "method": method, "status": status}
        )

    assert count("/users", "GET", "200") == 1
    assert count("/users/{name}/disable", "POST", "400") == 1
    assert count("/users", "GET", "303") == 1
    assert count("unmatched", "other", "405") == 1  # refused by the router, before any route
    assert registry.get_sample_value("emailops_http_request_duration_seconds_count", {"route": "/users"}) == 2


def test_without_email_settings_the_pages_show_the_first_account_of_the_index(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    """A deployment whose accounts all live in the index (no EMAIL_*): every page answers, on the
    index's first enabled account."""
    from emailops.accounts.fields import AccountDefaults, accounts_from_file
    from emailops.accounts.store import import_accounts
    from emailops.auth.crypto import SecretCipher, new_key

    key = new_key()
    mailbox = {"name": "help", "username": "bob@example.test", "password": "pw-Qx81"}
    mailbox |= {"imap_host": "127.0.0.1", "imap_port": 1143, "smtp_host": "127.0.0.1", "smtp_port": 1025}
    configs = accounts_from_file({"accounts": [mailbox]}, AccountDefaults(), {})
    import_accounts(engine, configs, SecretCipher([key]), actor=CLI)
    add_unknown_reply_and_quarantined_message(engine)  # rows of bob@example.test@127.0.0.1
    settings = console_settings(
        tmp_path,
        db_url,
        email_imap_host="",
        email_imap_port=None,
        email_smtp_host="",
        email_smtp_port=None,
        email_username="",
        email_password="",
        secrets_key=key,
    )
    assert not settings.has_default_account
    admin, _ = Console(settings, engine, MovingClock()).session("ann")
    for path in ("/", "/messages", "/outbox", "/quarantine", "/drafts", "/rules", "/settings"):
        assert admin.get(path).status_code == 200, path
    replies = admin.get("/api/v1/outbox").json()
    assert [reply["state"] for reply in replies["replies"]] == ["unknown"]
