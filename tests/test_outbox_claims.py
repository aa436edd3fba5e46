"""The outbox on the claimable-row helper, on SQLite and PostgreSQL: a claim expires by the
database's clock (a worker whose clock runs ahead cannot take another's claim), the outcome of a
claim is fenced by claimer and attempt, and the operator's retry and cancel touch one account."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, update

from emailops.config import ReplyConfig, ServerConfig, TlsSecurity
from emailops.replies import outbox
from emailops.replies.mailbox import MailboxSession
from emailops.replies.outbox import OutboxState
from emailops.replies.recovery import STALE_CLAIM
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage
from emailops.store.db_clock import db_now
from emailops.store.schema import outbox as outbox_table
from localmail.smtp_relay import LocalSmtpRelay
from tests import test_outbox
from tests.index_helpers import ACCOUNT, ALICE, index_engine

OTHER_ACCOUNT = "bob@example.test@127.0.0.1"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = index_engine(db_url)
    yield engine
    engine.dispose()


def add(engine: Engine, key: str, account: str = ACCOUNT) -> int:
    row_id = test_outbox.add(engine, key)
    with engine.begin() as conn:
        conn.execute(update(outbox_table).where(outbox_table.c.id == row_id).values(account=account))
    return row_id


def stored(engine: Engine, row_id: int) -> outbox.OutboxRow:
    with engine.connect() as conn:
        row = outbox.get_reply(conn, row_id)
    assert row is not None
    return row


def skewed_stage(engine: Engine, ahead: timedelta) -> OutboxStage:
    """A worker whose clock runs ``ahead``; it never connects (nothing is due for it to send)."""
    nowhere = ServerConfig(
        host="127.0.0.1", port=9, username=ALICE, password="x", security=TlsSecurity.NONE, timeout_seconds=1
    )
    return OutboxStage(
        engine,
        account=ACCOUNT,
        claimer="host-b:run-b:2:w1",
        config=ReplyConfig(from_address=ALICE),
        sender=SmtpSender(nowhere),
        mailbox=MailboxSession(nowhere),
        clock=lambda: datetime.now(UTC) + ahead,
    )


def test_a_worker_whose_clock_runs_ahead_cannot_take_an_unexpired_claim(engine: Engine) -> None:
    row_id = add(engine, "<skew@x>")
    with engine.begin() as conn:
        claimed = outbox.claim_next(conn, claimer="host-a:run-a:1:w1", now=datetime.now(UTC))
    assert claimed is not None and claimed.id == row_id
    stage = skewed_stage(engine, ahead=2 * STALE_CLAIM)
    try:
        assert stage.run_once() is False  # it ran its recovery of stale claims, and nothing was due
        assert stored(engine, row_id).state is OutboxState.SENDING  # twice the timeout ahead: took nothing
        # The claim really is older than STALE_CLAIM by the database's clock: now it is recovered.
        with engine.begin() as conn:
            aged = db_now(conn, -(STALE_CLAIM + timedelta(minutes=1)))
            conn.execute(update(outbox_table).where(outbox_table.c.id == row_id).values(claimed_at=aged))
        stage.next_recovery = 0.0
        stage.run_once()
    finally:
        stage.close()
    row = stored(engine, row_id)
    assert row.state is OutboxState.UNKNOWN and "may or may not" in (row.last_error or "")


def test_a_claim_made_with_a_clock_far_behind_still_expires_on_time(engine: Engine) -> None:
    row_id = add(engine, "<behind@x>")
    with engine.begin() as conn:
        # The claimer's clock is a day behind; the claim's time is the database's all the same.
        assert outbox.claim_next(conn, claimer="w1", now=datetime.now(UTC) + timedelta(days=1)) is not None
        assert outbox.recover_interrupted(conn, now=datetime.now(UTC), claim_timeout=STALE_CLAIM) == []
        conn.execute(
            update(outbox_table)
            .where(outbox_table.c.id == row_id)
            .values(claimed_at=db_now(conn, -2 * STALE_CLAIM))
        )
        assert outbox.recover_interrupted(conn, now=datetime.now(UTC), claim_timeout=STALE_CLAIM) == ["ack"]


def test_the_outcome_of_an_earlier_attempt_is_refused(engine: Engine) -> None:
    row_id = add(engine, "<fence@x>")
    now = datetime.now(UTC)
    with engine.begin() as conn:
        first = outbox.claim_next(conn, claimer="w1", now=now)
        assert first is not None and first.attempts == 1
        outbox.mark_transient_failure(conn, first, claimer="w1", reason="421", now=now, max_attempts=5)
        second = outbox.claim_next(conn, claimer="w1", now=now + timedelta(hours=1))
        assert second is not None and second.attempts == 2
        # The first attempt's late answer changes nothing; the second's is recorded.
        assert not outbox.mark_failed(conn, row_id, claimer="w1", reason="550 late", now=now, attempt=1)
        assert not outbox.mark_unknown(conn, row_id, claimer="w1", reason="late", now=now, attempt=1)
        current = outbox.get_reply(conn, row_id)
        assert current is not None and current.state is OutboxState.SENDING
        assert outbox.mark_failed(conn, row_id, claimer="w1", reason="550 now", now=now, attempt=2)
    assert stored(engine, row_id).last_error == "550 now"


def test_operator_retry_and_cancel_touch_only_the_named_account(engine: Engine) -> None:
    mine, theirs = add(engine, "<mine@x>"), add(engine, "<theirs@x>", account=OTHER_ACCOUNT)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(update(outbox_table).values(state="failed", attempts=3, last_error="550"))
        assert not outbox.retry_reply(conn, theirs, now=now, account=ACCOUNT)
        assert not outbox.cancel_reply(conn, theirs, now=now, account=ACCOUNT)
        assert outbox.retry_reply(conn, mine, now=now, account=ACCOUNT)
    other = stored(engine, theirs)
    assert (other.state, other.attempts) == (OutboxState.FAILED, 3)
    own = stored(engine, mine)
    assert (own.state, own.attempts) == (OutboxState.PENDING, 0)
    with engine.begin() as conn:
        assert outbox.cancel_reply(conn, theirs, now=now, account=OTHER_ACCOUNT)
    assert stored(engine, theirs).state is OutboxState.CANCELLED


def test_the_outbox_stage_closes_an_smtp_connection_left_unused(engine: Engine) -> None:
    # A worker serves every account's outbox: each account's connection it ever opened stayed
    # open (45 of 50 per worker in the 50-account soak). Its turn closes one unused for 30 s.
    now = [1000.0]
    with LocalSmtpRelay(None, {ALICE: "alice-pw"}) as relay:
        server = ServerConfig(
            host="127.0.0.1", port=relay.port, username=ALICE, password="alice-pw", security=TlsSecurity.NONE
        )
        sender = SmtpSender(server, monotonic=lambda: now[0])
        stage = OutboxStage(
            engine,
            account=ACCOUNT,
            claimer="host-a:run-a:1:w1",
            config=ReplyConfig(from_address=ALICE),
            sender=sender,
            mailbox=MailboxSession(server),
        )
        try:
            sender.send(envelope_from=ALICE, recipient="ann@example.org", raw=b"Subject: a\r\n\r\nhi\r\n")
            assert relay.open_sessions() == 1
            stage.run_once()  # nothing due, and the connection was used just now: kept
            assert relay.open_sessions() == 1
            now[0] += SmtpSender.IDLE_CLOSE_SECONDS
            stage.run_once()
            deadline = time.monotonic() + 10
            while relay.open_sessions() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert relay.open_sessions() == 0
        finally:
            stage.close()
