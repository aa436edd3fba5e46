"""The operator console in-process (Starlette's TestClient) on a real index, with a clock to move."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from starlette.testclient import TestClient

from emailops.audit import Actor
from emailops.users import accounts
from emailops.users.sessions import start_session
from localmail.dovecot import LocalDovecot
from prod.console.app import create_app
from prod.console.calls import ConsoleContext
from prod.console.metrics import HttpMetrics
from prod.runtime_settings import RuntimeSettings
from tests.index_helpers import ALICE, index_engine

BASE = "http://testserver"
CLI = Actor(name="cli:test", role="admin")
PASSWORDS = {
    "ann": "ann's long admin pass phrase",
    "otto": "otto's long operator pass phrase",
    "vic": "vic's long viewer pass phrase",
}
ROLES = {"ann": "admin", "otto": "operator", "vic": "viewer"}
# Settings whose values must never be shown.
SECRETS = {
    "email_password": "imap-secret-Zq81",
    "llm_api_key": "sk-llm-secret-Pw72",
    "sentry_dsn": "https://sentrykey-Yx55@o1.ingest.example.org/4",
    "llm_base_url": "https://llmuser:llmpass-Kk39@llm.example.org/v1",
}


@dataclass
class MovingClock:
    now: datetime = field(default_factory=lambda: datetime(2026, 5, 1, 9, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def console_settings(tmp_path: Path, db_url: str, **overrides: Any) -> RuntimeSettings:
    values: dict[str, Any] = {
        "email_imap_host": "127.0.0.1",
        "email_imap_port": 1143,
        "email_smtp_host": "127.0.0.1",
        "email_smtp_port": 1025,
        "email_username": "bob@example.test",
        "index_db_url": db_url,
        "state_dir": tmp_path / "state",
        "cache_dir": tmp_path / "cache",
        "llm_model": "m",
        "rules_file": tmp_path / "rules.toml",
        **SECRETS,
    }
    values.update(overrides)
    return RuntimeSettings(_env_file=None, **values)  # type: ignore[call-arg]


def add_users(engine: Engine) -> None:
    for name, password in PASSWORDS.items():
        accounts.add_user(engine, name, ROLES[name], password, actor=CLI)


@dataclass
class Console:
    settings: RuntimeSettings
    engine: Engine
    clock: MovingClock
    metrics: HttpMetrics | None = None

    def __post_init__(self) -> None:
        self.app = create_app(
            ConsoleContext(settings=self.settings, engine=self.engine, clock=self.clock), self.metrics
        )

    def client(self, source: str = "198.51.100.1") -> TestClient:
        return TestClient(self.app, base_url=BASE, client=(source, 50000), follow_redirects=False)

    def session(self, name: str, source: str = "198.51.100.1") -> tuple[TestClient, str]:
        """A client signed in as ``name`` (a session made directly: no Argon2 check) and its CSRF token."""
        session_id, session = start_session(self.engine, name, source, self.clock())
        client = self.client(source)
        client.cookies.set("emailops_session", session_id)
        return client, session.csrf_token


def sign_in_token(client: TestClient, path: str = "/sign-in") -> str:
    page = client.get(path)
    found = re.search(r'name="sign_in_token" value="([^"]+)"', page.text)
    assert found, page.text
    return found[1]


def sign_in(client: TestClient, name: str, password: str) -> Any:
    token = sign_in_token(client)
    return client.post(
        "/sign-in",
        data={"username": name, "password": password, "sign_in_token": token, "next": "/"},
        headers={"Origin": BASE},
    )


# The index key of the console's account (EMAIL_USERNAME bob@example.test on 127.0.0.1).
BOB_KEY = "bob@example.test@127.0.0.1"


def add_unknown_reply_and_quarantined_message(engine: Engine, account: str = BOB_KEY) -> tuple[int, int]:
    """An outbox reply of ``account`` (the console's) whose outcome is unknown, and a message its
    rules quarantined: (the reply's id, the message's row)."""
    from sqlalchemy import update

    from emailops.replies import outbox
    from emailops.store import folders, messages
    from emailops.store.schema import messages as messages_table
    from emailops.store.schema import outbox as outbox_table
    from tests.test_store import NOW, fetched

    with engine.begin() as conn:
        reply_id, _ = outbox.insert_reply(
            conn,
            account=account,
            inbound_key="<in-1@example.org>",
            message_pk=None,
            rule_name="ack",
            action="send",
            recipient="carol@example.org",
            reply_message_id="<reply-1@example.test>",
            subject="Re: question",
            raw=b"Subject: Re: question\r\n\r\nbody\r\n",
            now=NOW,
        )
        conn.execute(update(outbox_table).where(outbox_table.c.id == reply_id).values(state="unknown"))
        folder = folders.ensure_folder(conn, account, "INBOX")
        pk = messages.insert_messages(conn, folder.id, 1, [fetched(7)], baseline_uidnext=1, now=NOW)[7]
        conn.execute(
            update(messages_table)
            .where(messages_table.c.id == pk)
            .values(rules_state="quarantined", rules_attempts=3, quarantine_reason="the rules raised")
        )
    return reply_id, pk


def dovecot_settings(tmp_path: Path, db_url: str, dovecot: LocalDovecot, **overrides: Any) -> RuntimeSettings:
    """``console_settings`` whose EMAIL_* account is on ``dovecot`` (no TLS)."""
    return console_settings(
        tmp_path,
        db_url,
        email_imap_host=dovecot.host,
        email_imap_port=dovecot.imap_port,
        email_imap_security="none",
        **overrides,
    )


def alice_console(tmp_path: Path, db_url: str, dovecot: LocalDovecot) -> Console:
    """The console of alice's mailbox on ``dovecot`` (its IMAP sign-in), users as ``add_users``."""
    engine = index_engine(db_url)
    add_users(engine)
    settings = dovecot_settings(
        tmp_path, db_url, dovecot, email_username=ALICE, email_password=dovecot.password(ALICE)
    )
    return Console(settings, engine, MovingClock())


def add_failed_model_job(engine: Engine, account: str = BOB_KEY) -> int:
    """A model job of ``account`` (the console's) that failed (its retry and cancel are offered): its id."""
    from sqlalchemy import update

    from emailops.llm import jobs
    from emailops.store.schema import llm_jobs
    from tests.test_store import NOW

    with engine.begin() as conn:
        job_id, _ = jobs.insert_job(
            conn,
            account=account,
            inbound_key="<asked-1@example.org>",
            message_pk=None,
            rule_name="ai-answer",
            action="send",
            recipient="carol@example.org",
            subject="Re: a question",
            prompt="answer kindly",
            model="tiny-model",
            max_tokens=50,
            temperature=None,
            now=NOW,
        )
        conn.execute(
            update(llm_jobs).where(llm_jobs.c.id == job_id).values(state="failed", last_error="HTTP 400: bad")
        )
    return job_id


OAUTH2_ACCOUNT = "alice-oauth"
# The EMAIL_* account of ``accounts_console``: bob, with a password Dovecot refuses.
PASSWORD_ACCOUNT = "bob@example.test"


def accounts_console(
    tmp_path: Path, db_url: str, dovecot: LocalDovecot, auth_server: Any
) -> tuple[Console, str]:
    """A console of two mailboxes on ``dovecot``: the EMAIL_* account bob, whose password
    (``SECRETS["email_password"]``) the server refuses, and ``OAUTH2_ACCOUNT`` in the index: alice
    signing in with OAuth2 at ``auth_server`` (a LocalOAuth2Server), her refresh token revoked
    since. Returns the console and that (stored, encrypted) refresh token."""
    from emailops.accounts.store import import_accounts
    from emailops.auth.crypto import SecretCipher
    from localmail.dovecot import free_loopback_port
    from tests.oauth2_helpers import TOKEN_KEY, oauth2_account

    engine = index_engine(db_url)
    add_users(engine)
    oauth2 = oauth2_account(OAUTH2_ACCOUNT, ALICE, auth_server, dovecot, free_loopback_port())
    assert oauth2.oauth2 is not None and oauth2.oauth2.refresh_token is not None
    refresh_token = oauth2.oauth2.refresh_token
    import_accounts(engine, [oauth2], SecretCipher([TOKEN_KEY]), actor=CLI)
    auth_server.revoke_refresh_tokens()
    settings = dovecot_settings(
        tmp_path, db_url, dovecot, email_username=PASSWORD_ACCOUNT, secrets_key=TOKEN_KEY
    )
    return Console(settings, engine, MovingClock()), refresh_token


def record_refusal(console: Console, account_name: str) -> str:
    """Sign in to the account as ``emailops accounts test`` does and record the server's
    refusal as its workers would (account_state auth_failed): the refusal's text."""
    from emailops.store import account_state
    from prod.cli_accounts import try_sign_in

    account, result = try_sign_in(console.settings, console.engine, account_name)
    assert result.imap_error is not None, result
    with console.engine.begin() as conn:
        account_state.record(
            conn, account.index_key, account_state.Event.REFUSED, error_kind="auth", error=result.imap_error
        )
    return result.imap_error
