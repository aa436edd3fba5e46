"""Automatic replies end to end: a real IMAP server (Dovecot, Cyrus), an SMTP relay into it, the pipeline.

Alice's account runs the pipeline; Bob and others write to Alice; replies land in their mailboxes.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from email.utils import parseaddr
from pathlib import Path

import pytest
from sqlalchemy import Engine, text, update

from emailops import metrics
from emailops.config import ReplyConfig, TlsSecurity
from emailops.pipeline import MailPipeline
from emailops.processes import ProcessIdentity
from emailops.replies import outbox
from emailops.replies.delivery import deliver_next
from emailops.replies.mailbox import MailboxSession
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage, RulesStage
from emailops.store.schema import outbox as outbox_table
from localmail.imap_server import LocalImapServer
from localmail.smtp_relay import LocalSmtpRelay
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, sync_config

BOB = "bob@example.test"
RULES = """
[[rules]]
name = "support-ack"
[rules.match]
subject = "help"
[rules.reply]
template = \"\"\"Hello {sender_name},
we received "{subject}".\"\"\"
once_per_sender_days = 7
"""


def inbound(subject: str, *, sender: str = f"Bob <{BOB}>", n: int = 1, extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <in-{n}-{time.monotonic_ns()}@example.test>\r\n"
        f"Date: Tue, 2 Jan 2024 10:00:00 +0000\r\n{extra}\r\nplease help me {n}\r\n"
    ).encode()


def mailbox_of(imap_server: LocalImapServer, user: str) -> list[Message]:
    with imap_server.imap(user) as client:
        client.select_folder("INBOX", readonly=True)
        uids = client.search("ALL")
        return [message_from_bytes(d[b"BODY[]"]) for d in client.fetch(uids, ["BODY.PEEK[]"]).values()]


class Daemon:
    """The worker pipeline of Alice's account, stepped in this process."""

    def __init__(
        self,
        imap_server: LocalImapServer,
        relay: LocalSmtpRelay,
        db_url: str,
        rules_file: Path,
        **reply: object,
    ):
        self.engine: Engine = index_engine(db_url)
        self.config = ReplyConfig(from_address=ALICE, own_addresses=(ALICE,), rules_file=rules_file, **reply)  # type: ignore[arg-type]
        imap = imap_config(imap_server)
        smtp = imap_config(imap_server, port=relay.port, security=TlsSecurity.NONE)
        owner = str(ProcessIdentity.of_this_process(1, run="test"))
        self.pipeline = MailPipeline(
            self.engine,
            imap,
            sync_config(poll_interval_seconds=300),
            owner=owner,
            stages=[
                RulesStage(self.engine, account=ACCOUNT, config=self.config, mailbox=MailboxSession(imap)),
                OutboxStage(
                    self.engine,
                    account=ACCOUNT,
                    claimer=owner,
                    config=self.config,
                    sender=SmtpSender(smtp),
                    mailbox=MailboxSession(imap),
                ),
            ],
            step_seconds=0.2,
        )

    def run_until(self, done: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "condition not reached in time"
            self.pipeline.run_once()

    def settle(self, seconds: float = 2.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pipeline.run_once()

    def outbox(self) -> list[tuple[object, ...]]:
        with self.engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(text("SELECT rule_name, state, recipient, last_error FROM outbox"))
            ]

    def watching(self) -> bool:
        return any(w.idling for w in self.pipeline.watchers.values())

    def close(self) -> None:
        self.pipeline.close()


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    return path


@pytest.fixture
def outcomes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(rule, outcome) of each reply, as the code counts them in ``emailops_replies_total``.

    Metrics are off in this process: the calls are recorded here. test_monitoring_e2e.py sees the
    counts reach Prometheus from a running daemon."""
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(metrics, "reply_outcome", lambda rule, outcome: seen.append((rule, outcome)))
    return seen


@pytest.fixture
def daemon(
    imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, db_url: str, rules_file: Path
) -> Iterator[Daemon]:
    running = Daemon(imap_server, smtp_relay, db_url, rules_file)
    running.run_until(running.watching)
    yield running
    running.close()


def test_one_reply_with_the_right_headers(
    daemon: Daemon, imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay
) -> None:
    original = inbound("I need help", n=1)
    imap_server.deliver(ALICE, original)
    daemon.run_until(lambda: len(smtp_relay.accepted) == 1)
    daemon.settle(1.0)
    (reply,) = mailbox_of(imap_server, BOB)
    inbound_id = message_from_bytes(original)["Message-ID"]
    assert reply["Subject"] == "Re: I need help"
    assert reply["From"] == ALICE and parseaddr(reply["To"])[1] == BOB
    assert reply["In-Reply-To"] == inbound_id and inbound_id in reply["References"]
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["Message-ID"].endswith("@example.test>")
    assert 'we received "I need help"' in reply.get_payload(decode=True).decode()
    assert daemon.outbox() == [("support-ack", "sent", BOB, None)]
    assert len(smtp_relay.accepted) == 1


ROBOTS = {
    "auto-submitted": "Auto-Submitted: auto-generated\r\n",
    "precedence": "Precedence: bulk\r\n",
    "list": "List-Id: <team.lists.example.test>\r\n",
    "suppress": "X-Auto-Response-Suppress: All\r\n",
}


def test_no_reply_to_robots_lists_or_ourselves(
    daemon: Daemon, imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay
) -> None:
    for n, extra in enumerate(ROBOTS.values(), start=1):
        imap_server.deliver(ALICE, inbound("help", n=n, extra=extra))
    # A bounce: the null reverse path, which the delivery records as "Return-Path: <>".
    imap_server.deliver(ALICE, inbound("help", n=5), mail_from="")
    for n, sender in enumerate(
        (
            "MAILER-DAEMON@example.test",
            "postmaster@example.test",
            "noreply@example.test",
            "news-request@example.test",
            "owner-list@example.test",
            ALICE,
        ),
        start=10,
    ):
        imap_server.deliver(ALICE, inbound("help", sender=sender, n=n))
    daemon.run_until(lambda: _rules_done(daemon) == 11)
    daemon.settle(1.0)
    assert smtp_relay.accepted == []
    assert daemon.outbox() == []


def make_due(daemon: Daemon) -> None:
    with daemon.engine.begin() as conn:
        conn.execute(
            update(outbox_table).values(
                state="pending", next_attempt_at=datetime.now(UTC) - timedelta(seconds=1)
            )
        )


def _rules_done(daemon: Daemon) -> int:
    with daemon.engine.connect() as conn:
        return int(
            conn.execute(text("SELECT count(*) FROM messages WHERE rules_state = 'done'")).scalar_one()
        )


def test_one_reply_per_sender_within_the_window_and_none_after_restart(
    daemon: Daemon, imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, db_url: str, rules_file: Path
) -> None:
    imap_server.deliver(ALICE, inbound("help 1", n=1))
    daemon.run_until(lambda: len(smtp_relay.accepted) == 1)
    imap_server.deliver(ALICE, inbound("help 2", n=2))
    daemon.run_until(lambda: _rules_done(daemon) == 2)
    daemon.settle(1.0)
    assert len(smtp_relay.accepted) == 1
    daemon.close()
    restarted = Daemon(imap_server, smtp_relay, db_url, rules_file)
    restarted.run_until(restarted.watching)
    restarted.settle(2.0)
    restarted.close()
    assert len(smtp_relay.accepted) == 1
    assert len(mailbox_of(imap_server, BOB)) == 1


def test_mail_present_before_the_first_sync_is_not_answered(
    imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, db_url: str, rules_file: Path
) -> None:
    for n in range(1, 4):
        imap_server.deliver(ALICE, inbound("help, old mail", n=n))
    daemon = Daemon(imap_server, smtp_relay, db_url, rules_file)
    daemon.run_until(daemon.watching)
    daemon.settle(1.5)
    daemon.close()
    assert smtp_relay.accepted == []


def test_header_injection_gives_no_extra_header_or_recipient(
    daemon: Daemon, imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay
) -> None:
    subject = "help =?utf-8?q?me=0D=0ABcc:_evil@example.test?="
    imap_server.deliver(ALICE, inbound(subject, sender=f"=?utf-8?q?Bob=0D=0ACc:_x@evil.test?= <{BOB}>", n=1))
    daemon.run_until(lambda: len(smtp_relay.accepted) == 1)
    (accepted,) = smtp_relay.accepted
    assert list(accepted.rcpt_tos) == [BOB]
    reply = message_from_bytes(accepted.data)
    assert reply.get_all("Bcc") is None and reply.get_all("Cc") is None
    assert len(reply.get_all("Subject")) == 1 and "\n" not in reply["Subject"]


def test_smtp_down_then_up_delivers_once(
    daemon: Daemon, imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, outcomes: list[tuple[str, str]]
) -> None:
    smtp_relay.stop()
    imap_server.deliver(ALICE, inbound("help while down", n=1))
    daemon.run_until(lambda: any(r[1] == "pending" and r[3] for r in daemon.outbox()))
    smtp_relay.start()
    make_due(daemon)  # skip the backoff wait instead of sleeping a minute
    daemon.run_until(lambda: len(smtp_relay.accepted) == 1)
    daemon.settle(1.0)
    assert len(smtp_relay.accepted) == 1
    assert [r[1] for r in daemon.outbox()] == ["sent"]
    assert outcomes == [("support-ack", "queued"), ("support-ack", "retry"), ("support-ack", "sent")]


def test_a_permanent_refusal_fails_with_its_reason(
    daemon: Daemon, imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, outcomes: list[tuple[str, str]]
) -> None:
    smtp_relay.fail_next(550, "5.7.1 mailbox unavailable")
    imap_server.deliver(ALICE, inbound("help", n=1))
    daemon.run_until(lambda: bool(daemon.outbox()) and daemon.outbox()[0][1] == "failed")
    (row,) = daemon.outbox()
    assert "550" in str(row[3]) and "mailbox unavailable" in str(row[3])
    assert smtp_relay.accepted == []
    assert outcomes == [("support-ack", "queued"), ("support-ack", "failed")]


def _claim_then_die(db_url: str) -> None:
    """A worker that claims a reply and is killed before the SMTP answer (as kill -9 would)."""
    import os

    engine = index_engine(db_url)

    class DyingSender:
        def send(self, **_: object) -> str:
            os._exit(9)

    claimer = str(ProcessIdentity.of_this_process(7, run="test"))
    deliver_next(engine, DyingSender(), claimer=claimer, envelope_from=ALICE, max_attempts=5)  # type: ignore[arg-type]


def test_a_crash_between_claim_and_send_leaves_unknown_and_is_not_resent(
    daemon: Daemon,
    imap_server: LocalImapServer,
    smtp_relay: LocalSmtpRelay,
    db_url: str,
    outcomes: list[tuple[str, str]],
) -> None:
    smtp_relay.stop()  # keep the reply in the outbox until the dying worker claims it
    imap_server.deliver(ALICE, inbound("help", n=1))
    daemon.run_until(lambda: bool(daemon.outbox()))
    make_due(daemon)
    smtp_relay.start()
    child = multiprocessing.get_context("spawn").Process(target=_claim_then_die, args=(db_url,))
    child.start()
    child.join(30)
    assert child.exitcode == 9
    assert [r[1] for r in daemon.outbox()] == ["sending"]
    daemon.pipeline.stages[1].next_recovery = 0  # type: ignore[attr-defined]
    daemon.settle(1.5)
    (row,) = daemon.outbox()
    assert row[1] == "unknown" and "interrupted" in str(row[3])
    assert smtp_relay.accepted == []
    # Counted as unknown once, by the process that found the claim interrupted (the alert's input).
    assert outcomes[-1] == ("support-ack", "unknown") and outcomes.count(("support-ack", "unknown")) == 1
    with daemon.engine.connect() as conn:
        assert [r.state for r in outbox.list_replies(conn, states=("unknown",))] == ["unknown"]


def test_draft_flag_and_move_actions(
    imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, db_url: str, tmp_path: Path
) -> None:
    for folder in ("Drafts", "Handled"):
        imap_server.create_folder(ALICE, folder)
    rules = tmp_path / "draft-rules.toml"
    rules.write_text(
        '[[rules]]\nname = "draft-it"\n[rules.match]\nsubject = "quote"\n'
        '[rules.reply]\ntemplate = "Draft for {sender_name}"\ndraft = true\n'
        '[rules.actions]\nflag = true\nmove = "Handled"\n'
    )
    daemon = Daemon(imap_server, smtp_relay, db_url, rules)
    daemon.run_until(daemon.watching)
    imap_server.deliver(ALICE, inbound("quote please", n=1))
    daemon.run_until(lambda: bool(daemon.outbox()) and daemon.outbox()[0][1] == "sent")
    daemon.close()
    assert smtp_relay.accepted == []
    with imap_server.imap(ALICE) as client:
        client.select_folder("Drafts", readonly=True)
        (draft,) = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS"]).values()
        assert b"\\Draft" in draft[b"FLAGS"]
        assert message_from_bytes(draft[b"BODY[]"])["Subject"] == "Re: quote please"
        client.select_folder("Handled", readonly=True)
        (moved,) = client.fetch(client.search("ALL"), ["FLAGS"]).values()
        assert b"\\Flagged" in moved[b"FLAGS"]
        client.select_folder("INBOX", readonly=True)
        assert client.search("ALL") == []


def test_dry_run_logs_decisions_and_sends_nothing(
    imap_server: LocalImapServer,
    smtp_relay: LocalSmtpRelay,
    db_url: str,
    rules_file: Path,
    capsys: pytest.CaptureFixture[str],
    outcomes: list[tuple[str, str]],
) -> None:
    daemon = Daemon(imap_server, smtp_relay, db_url, rules_file, dry_run=True)
    daemon.run_until(daemon.watching)
    imap_server.deliver(ALICE, inbound("help in dry run", n=1))
    daemon.run_until(lambda: _rules_done(daemon) == 1)
    daemon.settle(1.0)
    daemon.close()
    assert smtp_relay.accepted == [] and daemon.outbox() == []
    assert "dry run: would reply" in capsys.readouterr().out
    assert outcomes == [("support-ack", "dry_run")]


def test_a_copy_of_each_sent_reply_goes_to_sent(
    imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, db_url: str, rules_file: Path
) -> None:
    imap_server.create_folder(ALICE, "Sent")
    daemon = Daemon(imap_server, smtp_relay, db_url, rules_file, save_sent_copy=True)
    daemon.run_until(daemon.watching)
    imap_server.deliver(ALICE, inbound("help with a copy", n=1))
    daemon.run_until(lambda: len(smtp_relay.accepted) == 1)
    daemon.settle(0.5)
    daemon.close()
    with imap_server.imap(ALICE) as client:
        client.select_folder("Sent", readonly=True)
        (copy,) = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS"]).values()
    assert b"\\Seen" in copy[b"FLAGS"]
    assert message_from_bytes(copy[b"BODY[]"])["Subject"] == "Re: help with a copy"


def test_restoring_an_older_backup_does_not_answer_again(
    imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, tmp_path: Path, rules_file: Path
) -> None:
    from emailops.maintenance import backup_sqlite

    db_url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    daemon = Daemon(imap_server, smtp_relay, db_url, rules_file)
    daemon.run_until(daemon.watching)
    daemon.settle(0.5)
    backup_sqlite(db_url, tmp_path / "before.sqlite3")  # taken before the mail below arrives
    imap_server.deliver(ALICE, inbound("help before the disaster", n=1))
    daemon.run_until(lambda: len(smtp_relay.accepted) == 1)
    daemon.close()
    with imap_server.imap(ALICE) as client:
        client.select_folder("INBOX", readonly=True)
        assert b"$AutoReplied" in next(iter(client.get_flags(client.search("ALL")).values()))

    daemon.engine.dispose()
    (tmp_path / "before.sqlite3").replace(tmp_path / "index.sqlite3")
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    restored = Daemon(imap_server, smtp_relay, db_url, rules_file)
    restored.run_until(lambda: _rules_done(restored) == 1)
    restored.settle(1.0)
    restored.close()
    assert len(smtp_relay.accepted) == 1


def test_mailbox_changes_reach_mail_that_arrived_after_the_session_opened(
    imap_server: LocalImapServer, smtp_relay: LocalSmtpRelay, db_url: str, tmp_path: Path
) -> None:
    """The actions session selected INBOX for the first message; the second must not be missed."""
    rules = tmp_path / "flag-rules.toml"
    rules.write_text(
        '[[rules]]\nname = "flag-it"\n[rules.match]\nsubject = "flag"\n[rules.actions]\nflag = true\n'
    )
    daemon = Daemon(imap_server, smtp_relay, db_url, rules)
    daemon.run_until(daemon.watching)
    for n in (1, 2, 3):
        imap_server.deliver(ALICE, inbound(f"flag me {n}", n=n))
        daemon.run_until(lambda n=n: _rules_done(daemon) == n)
    daemon.close()
    with imap_server.imap(ALICE) as client:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags(client.search("ALL"))
    assert len(flags) == 3 and all(b"\\Flagged" in f for f in flags.values()), flags
