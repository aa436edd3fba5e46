"""The production worker unit (``prod.mail_worker.create_unit``) against a real Dovecot and SMTP relay."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from imapclient import FLAGGED

from bench.imap_proxy import CountingProxy
from emailops.pipeline import MailPipeline
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
