"""The replies' mailbox session within the account's IMAP connection budget, against Dovecot: it
takes a slot, is closed when unused and gives the slot back; a rule's change, a draft or a Sent
copy that finds no slot free waits and is made once one is, without an error or a failure counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from imapclient import FLAGGED
from sqlalchemy import Engine, update
from structlog.testing import capture_logs
from tenacity import wait_fixed

from emailops.account_watch import AccountWatch
from emailops.clock import utc_now
from emailops.config import ReplyConfig, SignInLimits
from emailops.imap.connection_budget import AccountConnections
from emailops.imap.errors import ImapNoConnectionSlotError
from emailops.pipeline import MailPipeline
from emailops.processes import ProcessIdentity
from emailops.replies import outbox, put_off
from emailops.replies.mailbox import MailboxSession
from emailops.replies.outbox import OutboxState
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage, RulesStage
from emailops.store import connection_slots
from emailops.store.schema import mailbox_changes
from localmail.dovecot import LocalDovecot
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, rows, sync_config

MOVE_RULE = """
[[rules]]
name = "file-invoices"
[rules.match]
subject = "invoice"
[rules.actions]
flag = true
move = "Archive"
"""
TTL = timedelta(seconds=30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget_of_one(engine: Engine, monotonic: Callable[[], float] = time.monotonic) -> AccountConnections:
    return AccountConnections(
        engine, ACCOUNT, holder="w1", max_connections=1, limits=SignInLimits(), ttl=TTL, monotonic=monotonic
    )


def take_the_slot(engine: Engine) -> int:
    """Another container takes the account's one slot."""
    with engine.begin() as conn:
        slot = connection_slots.acquire_slot(conn, ACCOUNT, "other", 1, TTL)
    assert slot is not None
    return slot


def give_the_slot_back(engine: Engine, slot: int) -> None:
    with engine.begin() as conn:
        connection_slots.release_slot(conn, ACCOUNT, "other", slot)


def make_put_off_changes_due(engine: Engine, *stages: RulesStage | OutboxStage) -> None:
    with engine.begin() as conn:
        conn.execute(update(mailbox_changes).values(due_at=utc_now() - timedelta(minutes=1)))
    for stage in stages:
        stage.put_off.next_check = 0.0


def test_the_session_holds_a_slot_while_open_and_gives_it_back_once_closed_unused(
    dovecot: LocalDovecot, db_url: str
) -> None:
    engine = index_engine(db_url)
    clock = Clock()
    connections = budget_of_one(engine, clock)
    session = MailboxSession(imap_config(dovecot), connector=connections.connect, monotonic=clock)
    watch = AccountWatch(
        engine,
        imap_config(dovecot),
        sync_config(),
        owner="w1",
        sign_ins=SignInLimits(),
        clock=utc_now,
        connections=connections,
        sessions=[session],
    )
    try:
        session.client("INBOX")
        assert connections.held == 1 and dovecot.logged_in(ALICE) == 1
        with pytest.raises(ImapNoConnectionSlotError):  # the budget's one slot is the session's
            connections.connect(imap_config(dovecot))
        clock.now += MailboxSession.IDLE_CLOSE_SECONDS - 1
        watch.release_closed()
        assert session.open_client is not None and connections.held == 1  # used recently: kept
        clock.now += 1
        watch.release_closed()  # unused for IDLE_CLOSE_SECONDS: logged out
        assert session.open_client is None and connections.held == 1  # the server counts it a moment
        clock.now += 1
        watch.release_closed()
        assert connections.held == 0
        deadline = time.monotonic() + 10
        while dovecot.logged_in(ALICE):
            assert time.monotonic() < deadline, "the session was not logged out"
            time.sleep(0.05)
    finally:
        watch.close()


def test_a_rule_change_that_finds_no_slot_free_is_made_once_one_is(
    dovecot: LocalDovecot, db_url: str, tmp_path: Path
) -> None:
    dovecot.create_folder(ALICE, "Archive")
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(MOVE_RULE)
    engine = index_engine(db_url)
    imap = imap_config(dovecot)
    indexing = MailPipeline(
        engine, imap, sync_config(), owner=str(ProcessIdentity.of_this_process(1, run="t"))
    )
    config = ReplyConfig(from_address=ALICE, own_addresses=(ALICE,), rules_file=rules_file)
    session = MailboxSession(imap, connector=budget_of_one(engine).connect)
    stage = RulesStage(engine, account=ACCOUNT, config=config, mailbox=session, check_move_folders=False)
    # A container holds the account's one slot (the indexing here has a budget of its own).
    slot = take_the_slot(engine)
    try:
        deadline = time.monotonic() + 20
        while not any(w.idling for w in indexing.watchers.values()):
            assert time.monotonic() < deadline, "not watching in time"
            indexing.run_once()
        dovecot.deliver(
            ALICE, b"From: bob@example.test\r\nSubject: invoice 7\r\nMessage-ID: <i7@x>\r\n\r\nhi\r\n"
        )
        while rows(engine, "SELECT rules_state FROM messages") != [("pending",)]:
            assert time.monotonic() < deadline, "not indexed in time"
            indexing.run_once()

        with capture_logs() as logs:
            stage.run_once()  # no slot: put off, not dropped with an error
            make_put_off_changes_due(engine, stage)
            stage.run_once()  # still none: put off again
        assert rows(engine, "SELECT rules_state FROM messages") == [("done",)]
        assert rows(engine, "SELECT attempts, replied FROM mailbox_changes") == [(2, False)]
        lines = [e for e in logs if e["event"] != "rule matched"]
        assert [e["log_level"] for e in lines] == ["info"] and "made later" in lines[0]["event"]
        with dovecot.imap(ALICE) as client:
            client.select_folder("INBOX", readonly=True)
            assert len(client.search(["ALL"])) == 1 and not client.search(["FLAGGED"])

        give_the_slot_back(engine, slot)
        make_put_off_changes_due(engine, stage)
        with capture_logs() as logs:
            stage.run_once()
        assert rows(engine, "SELECT COUNT(*) FROM mailbox_changes") == [(0,)]
        assert [e["log_level"] for e in logs] == ["info"] and "tried again" in logs[0]["event"]
        with dovecot.imap(ALICE) as client:
            client.select_folder("INBOX", readonly=True)
            assert client.search(["ALL"]) == []
            client.select_folder("Archive", readonly=True)
            (uid,) = client.search(["ALL"])
            assert FLAGGED in client.get_flags([uid])[uid]
    finally:
        indexing.close()
        stage.close()


def test_a_draft_or_sent_copy_that_finds_no_slot_free_waits_without_a_failure_counted(
    dovecot: LocalDovecot, db_url: str
) -> None:
    for folder in ("Drafts", "Sent"):
        dovecot.create_folder(ALICE, folder)
    engine = index_engine(db_url)
    config = ReplyConfig(from_address=ALICE, own_addresses=(ALICE,), send_max_attempts=1)
    session = MailboxSession(imap_config(dovecot), connector=budget_of_one(engine).connect)
    stage = OutboxStage(
        engine,
        account=ACCOUNT,
        claimer="w1",
        config=config,
        sender=SmtpSender(imap_config(dovecot)),  # never used: nothing is sent by SMTP here
        mailbox=session,
    )
    with engine.begin() as conn:
        draft, _ = outbox.insert_reply(
            conn,
            account=ACCOUNT,
            inbound_key="<in@x>",
            message_pk=None,
            rule_name="ack",
            action="draft",
            recipient="bob@example.test",
            reply_message_id="<draft@x>",
            subject="Re: hi",
            raw=b"Message-ID: <draft@x>\r\nSubject: Re: hi\r\n\r\nbody\r\n",
            now=utc_now(),
        )
    slot = take_the_slot(engine)
    try:
        with capture_logs() as logs:
            stage.run_once()
            stage._copy_to_sent(draft)  # as after a send: the reply's copy for the Sent folder
        with engine.connect() as conn:
            row = outbox.get_reply(conn, draft)
        # Pending again, its one attempt not used up (send_max_attempts=1 would have failed it).
        assert row is not None and row.state is OutboxState.PENDING and row.attempts == 0
        assert rows(engine, "SELECT outbox_id, attempts FROM mailbox_changes") == [(draft, 1)]
        assert {e["log_level"] for e in logs} == {"info"} and len(logs) == 2

        give_the_slot_back(engine, slot)
        with engine.begin() as conn:
            conn.execute(update(outbox.outbox).values(next_attempt_at=utc_now() - timedelta(minutes=1)))
        make_put_off_changes_due(engine, stage)
        stage.run_once()
        with engine.connect() as conn:
            row = outbox.get_reply(conn, draft)
        assert row is not None and row.state is OutboxState.SENT
        assert rows(engine, "SELECT COUNT(*) FROM mailbox_changes") == [(0,)]
        with dovecot.imap(ALICE) as client:
            for folder in ("Drafts", "Sent"):
                client.select_folder(folder, readonly=True)
                assert len(client.search(["HEADER", "Message-ID", "<draft@x>"])) == 1
    finally:
        stage.close()


def test_changes_put_off_one_after_another_are_each_taken_when_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(put_off, "BACKOFF", wait_fixed(0.3))
    engine = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    with engine.begin() as conn:
        replies = [
            outbox.insert_reply(
                conn,
                account=ACCOUNT,
                inbound_key=f"<in{n}@x>",
                message_pk=None,
                rule_name="ack",
                action="send",
                recipient="bob@example.test",
                reply_message_id=f"<r{n}@x>",
                subject="Re: hi",
                raw=b"Subject: Re: hi\r\n\r\nbody\r\n",
                now=utc_now(),
            )[0]
            for n in range(2)
        ]
    changes = put_off.PutOffChanges(engine, ACCOUNT, "sent_copy")
    assert changes.take_due() == []  # the look at the start: none left by an earlier run
    changes.put_off(outbox_id=replies[0])
    time.sleep(1.5)  # the second is due after the first is taken
    changes.put_off(outbox_id=replies[1])
    taken: list[int | None] = []
    deadline = time.monotonic() + 10
    while len(taken) < 2:
        assert time.monotonic() < deadline, f"only {taken} taken"
        taken += [change.outbox_id for change in changes.take_due()]
        time.sleep(0.05)
    assert taken == replies
