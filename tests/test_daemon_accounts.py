"""The daemon (``python -m prod.run``) serves every enabled account of the index, with no EMAIL_*
settings, against a real Dovecot and SMTP relay, on SQLite and PostgreSQL: each account's mail is
indexed under it and answered by its rules, and accounts added or disabled while it runs are
served, or let go of, within a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from emailops.auth.crypto import new_key
from emailops.store.schema import folders, messages
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from tests.index_helpers import index_engine, message
from tests.test_accounts import run
from tests.test_daemon_e2e import wait_for

REPO = Path(__file__).resolve().parents[1]
USERS = {
    "alice@example.test": "alice-pw",
    "bob@example.test": "bob-pw",
    "carol@example.test": "carol-pw",
}
# A rule for alice only and one for every account, each replying.
RULES = """
[[rules]]
name = "alice only"
[rules.match]
accounts = ["alice"]
subject = "help"
[rules.reply]
template = "Alice got {subject}"

[[rules]]
name = "everyone"
[rules.match]
subject = "hello"
[rules.reply]
template = "Got {subject}"
"""


@pytest.fixture
def mail() -> Iterator[tuple[LocalDovecot, LocalSmtpRelay]]:
    with LocalDovecot(USERS) as server, LocalSmtpRelay(server, USERS) as relay:
        yield server, relay


def add(env: dict[str, str], server: LocalDovecot, relay: LocalSmtpRelay, name: str) -> None:
    user = f"{name}@example.test"
    added = run(
        env,
        "accounts",
        "add",
        name,
        f"--username={user}",
        f"--imap-host={server.host}",
        f"--imap-port={server.imap_port}",
        "--imap-security=none",
        "--smtp-host=127.0.0.1",
        f"--smtp-port={relay.port}",
        "--smtp-security=none",
        "--password-stdin",
        stdin=USERS[user] + "\n",
    )
    assert added.returncode == 0, added.stderr


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    """No EMAIL_* at all: the accounts live in the index."""
    (tmp_path / "rules.toml").write_text(RULES)
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("EMAIL_", "SENTRY_"))}
    return environ | {
        "INDEX_DB_URL": db_url,
        "SECRETS_KEY": new_key(),
        "STATE_DIR": str(tmp_path / "state"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "LOG_FILE_ENABLED": "false",
        "RULES_FILE": str(tmp_path / "rules.toml"),
        "WORKERS": "1",
        "SHUTDOWN_TIMEOUT_SECONDS": "10",
        "ENV": "test",
    }


@pytest.fixture
def daemon(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        with (tmp_path / "stdout.log").open("w") as out, (tmp_path / "stderr.log").open("w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, stdout=out, stderr=err
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_without_email_settings_or_accounts_the_daemon_names_both_ways(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78
    record = json.loads(result.stdout.splitlines()[-1])
    assert "EMAIL_USERNAME" in record["message"] and "emailops accounts add" in record["message"]


def test_the_daemon_serves_every_enabled_account_of_the_index(
    mail: tuple[LocalDovecot, LocalSmtpRelay],
    env: dict[str, str],
    db_url: str,
    daemon: Callable[[], subprocess.Popen[bytes]],
) -> None:
    server, relay = mail
    for name in ("alice", "bob"):
        add(env, server, relay, name)
    engine = index_engine(db_url)

    def rules_done(account: str, subject: str) -> bool:
        with engine.connect() as conn:
            states = conn.execute(
                select(messages.c.rules_state)
                .join(folders, folders.c.id == messages.c.folder_id)
                .where(folders.c.account == account, messages.c.subject == subject)
            ).scalars()
            return any(state != "pending" for state in states)

    def replies_from(user: str) -> list[str]:
        return [m.rcpt_tos[0] for m in relay.accepted if m.mail_from == user]

    def found(name: str, query: str) -> int:
        searched = run(env, "search", query, "--account", name, "--json")
        assert searched.returncode == 0, searched.stderr
        return len(json.loads(searched.stdout))

    def synced(user: str) -> bool:
        with engine.connect() as conn:
            query = select(folders.c.last_sync_at).where(folders.c.account == f"{user}@{server.host}")
            return any(conn.execute(query).scalars())

    process = daemon()
    # The rules answer new mail only: mail that arrives once the first sync is done.
    wait_for(lambda: synced("alice@example.test") and synced("bob@example.test"), 60, "first syncs")
    for n, user in enumerate(("alice@example.test", "bob@example.test")):
        server.deliver(user, message(10 * n + 1, subject="help", body=f"{user.split('@')[0]}wombat"))
        server.deliver(user, message(10 * n + 2, subject="hello"))
    # alice answers both; bob only the rule for everyone, once per message.
    wait_for(lambda: len(replies_from("alice@example.test")) == 2, 60, "alice's replies")
    wait_for(lambda: len(replies_from("bob@example.test")) == 1, 60, "bob's reply")
    wait_for(lambda: rules_done(f"bob@example.test@{server.host}", "help"), 30, "bob's rules on 'help'")
    assert sorted(replies_from("alice@example.test")) == ["sender1@example.org", "sender2@example.org"]
    assert replies_from("bob@example.test") == ["sender12@example.org"]
    assert (found("alice", "alicewombat"), found("alice", "bobwombat")) == (1, 0)
    assert (found("bob", "alicewombat"), found("bob", "bobwombat")) == (0, 1)

    # An account added while the daemon runs is indexed within a minute.
    server.deliver("carol@example.test", message(31, subject="note", body="carolwombat"))
    add(env, server, relay, "carol")
    wait_for(lambda: found("carol", "carolwombat") == 1, 60, "carol's mail indexed")

    # A disabled account's folders are let go of within a minute; the others are still served.
    assert run(env, "accounts", "disable", "bob").returncode == 0

    def bob_leases() -> list[str | None]:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(folders.c.lease_owner).where(
                        folders.c.account == f"bob@example.test@{server.host}"
                    )
                ).scalars()
            )

    assert any(bob_leases())
    wait_for(lambda: not any(bob_leases()), 60, "bob's folder leases released")
    server.deliver("alice@example.test", message(41, subject="hello"))
    wait_for(lambda: len(replies_from("alice@example.test")) == 3, 30, "alice still served")

    # Enabled again, it is served again: what arrived meanwhile is indexed.
    server.deliver("bob@example.test", message(51, subject="note", body="bobotter"))
    assert found("bob", "bobotter") == 0
    assert run(env, "accounts", "enable", "bob").returncode == 0
    wait_for(lambda: found("bob", "bobotter") == 1, 60, "bob's mail indexed again")
    assert process.poll() is None
