"""The production worker unit (``prod.mail_worker.create_unit``) against a real Dovecot and SMTP relay."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from imapclient import FLAGGED
from sqlalchemy import func, select

from bench.imap_proxy import CountingProxy
from emailops.pipeline import MailPipeline
from emailops.replies.mailbox import MailboxSession
from emailops.store import connection_slots
from emailops.store.schema import folders, mailbox_changes
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from prod.mail_worker import create_unit
from prod.runtime_settings import RuntimeSettings
from tests.index_helpers import ALICE, daemon_env
from tests.test_replies_e2e import inbound

RULES = """
[[rules]]
name = "support-ack"
[rules.match]
subject = "help"
[rules.reply]
template = "Hello {sender_name}, we received your message."
[rules.actions]
flag = true
"""
# The commands of the mailbox session: the rule's flags, and the copy of the reply in Sent.
MAILBOX_CHANGES = {"UID STORE", "APPEND"}


def run_until(unit: MailPipeline, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        unit.run_once()


def test_a_worker_makes_rule_changes_and_saves_sent_copies_over_one_imap_session(
    dovecot: LocalDovecot,
    smtp_relay: LocalSmtpRelay,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dovecot.create_folder(ALICE, "Sent")
    (tmp_path / "rules.toml").write_text(RULES)
    with CountingProxy(dovecot.host, dovecot.imap_port) as proxy:
        env = daemon_env(
            dovecot,
            tmp_path,
            INDEX_DB_URL=db_url,
            EMAIL_IMAP_PORT=str(proxy.port),
            EMAIL_SMTP_PORT=str(smtp_relay.port),
            SAVE_SENT_COPY="true",
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        unit = create_unit(RuntimeSettings.from_env(), 1)
        try:
            run_until(unit, lambda: any(w.idling for w in unit.watchers.values()))
            watching = len(proxy.sessions())
            dovecot.deliver(ALICE, inbound("help please"))
            run_until(unit, lambda: sum(s.count("APPEND") for s in proxy.sessions()) == 1)
        finally:
            unit.close()
        sessions = proxy.sessions()
    assert len(smtp_relay.accepted) == 1
    with dovecot.imap(ALICE) as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search(["ALL"])
        assert FLAGGED in client.get_flags([uid])[uid]
        client.select_folder("Sent", readonly=True)
        assert len(client.search(["ALL"])) == 1
    # The flags and the Sent copy went over one connection, the only one opened after indexing began.
    changing = [verbs for verbs in sessions if MAILBOX_CHANGES & set(verbs)]
    assert len(changing) == 1 and set(changing[0]) >= MAILBOX_CHANGES
    assert len(sessions) == watching + 1


MOVE_RULES = """
[[rules]]
name = "file-it"
[rules.match]
subject = "file"
[rules.actions]
flag = true
move = "Done"
"""


def test_rule_changes_stay_within_the_accounts_connection_budget_and_wait_for_a_free_slot(
    dovecot: LocalDovecot, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget of two and two folders: the worker polls them over its shared connection (with the
    # mailbox session outside the budget it would IDLE on one and poll the other), and a rule flags
    # and moves new mail over its mailbox session. While another holder (a container) has the last
    # slot, the changes wait; once it is free they are made. Dovecot never counts more than two
    # sessions of the account, and the mailbox session closes when unused.
    monkeypatch.setattr(MailboxSession, "IDLE_CLOSE_SECONDS", 1.0)
    for folder in ("Other", "Done"):
        dovecot.create_folder(ALICE, folder)
    (tmp_path / "rules.toml").write_text(MOVE_RULES)
    env = daemon_env(
        dovecot,
        tmp_path,
        INDEX_DB_URL=db_url,
        EMAIL_FOLDERS="INBOX,Other",
        IMAP_MAX_CONNECTIONS="2",
        IMAP_STARTUP_JITTER_SECONDS="0",
        POLL_INTERVAL_SECONDS="0.5",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = RuntimeSettings.from_env()
    unit = create_unit(settings, 1)
    engine = unit.engine
    sessions: list[int] = []

    def step_until(done: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"condition not reached in time (sessions {sessions})"
            unit.run_once()
            sessions.append(dovecot.logged_in(ALICE))

    blocked: list[tuple[str, int]] = []

    def block_a_slot() -> bool:
        with engine.begin() as conn:
            account = conn.execute(select(folders.c.account)).scalars().first() or ""
            slot = connection_slots.acquire_slot(conn, account, "other", 2, timedelta(minutes=5))
        if slot is not None:
            blocked.append((account, slot))
        return bool(blocked)

    def put_off() -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(mailbox_changes)).scalar_one())

    def moved() -> int:
        with dovecot.imap(ALICE) as client:
            client.select_folder("Done", readonly=True)
            return len(client.search(["FLAGGED"]))

    try:
        step_until(lambda: len([s for s in unit.status() if s.last_sync_at]) == 2)
        step_until(block_a_slot)
        for n in range(6):
            dovecot.deliver(ALICE, inbound("please file this", n=n))
        step_until(lambda: put_off() == 6)
        assert moved() == 0
        with engine.begin() as conn:
            connection_slots.release_slot(conn, blocked[0][0], "other", blocked[0][1])
        step_until(lambda: moved() == 6)
        assert put_off() == 0
        assert max(sessions) <= 2, sessions
        # Unused, the sessions close: only the watcher's shared connection is left.
        step_until(lambda: dovecot.logged_in(ALICE) == 1)
    finally:
        unit.close()
    with dovecot.imap(ALICE) as client:
        client.select_folder("INBOX", readonly=True)
        assert client.search(["ALL"]) == []
