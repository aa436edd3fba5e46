"""The outbox state machine against SQLite and PostgreSQL (``db_url`` runs each test on both)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from emailops.replies import outbox
from emailops.replies.outbox import OutboxState
from emailops.store.database import create_index_engine
from emailops.store.schema import metadata

T0 = datetime(2024, 5, 6, 8, 0, 0, tzinfo=UTC)
ACCOUNT = "me@example.net@imap.example.net"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_index_engine(db_url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def add(
    engine: Engine, key: str = "<m1@x>", rule: str = "ack", *, action: str = "send", now: datetime = T0
) -> int:
    with engine.begin() as conn:
        row_id, created = outbox.insert_reply(
            conn,
            account=ACCOUNT,
            inbound_key=key,
            message_pk=None,
            rule_name=rule,
            action=action,
            recipient="Alice@Example.org",
            reply_message_id=f"<autoreply.{key.strip('<>')}@example.net>",
            subject="Re: hi",
            raw=b"Subject: Re: hi\r\n\r\nbody\r\n",
            now=now,
        )
    assert created
    return row_id


def claim(engine: Engine, claimer: str = "w1", now: datetime = T0) -> outbox.OutboxRow | None:
    with engine.begin() as conn:
        return outbox.claim_next(conn, claimer=claimer, now=now)


def state(engine: Engine, row_id: int) -> outbox.OutboxRow:
    with engine.connect() as conn:
        row = outbox.get_reply(conn, row_id)
    assert row is not None
    return row


def test_insert_is_unique_per_inbound_message_and_rule(engine: Engine) -> None:
    first = add(engine)
    with engine.begin() as conn:
        again, created = outbox.insert_reply(
            conn,
            account=ACCOUNT,
            inbound_key="<m1@x>",
            message_pk=None,
            rule_name="ack",
            action="send",
            recipient="other@x",
            reply_message_id="<z@x>",
            subject="",
            raw=b"x",
            now=T0,
        )
    assert (again, created) == (first, False)
    assert add(engine, rule="other") != first
    row = state(engine, first)
    assert row.state is OutboxState.PENDING and row.recipient == "alice@example.org" and row.attempts == 0
    assert row.created_at == T0 and row.raw.startswith(b"Subject: Re: hi")


def test_claim_send_sent(engine: Engine) -> None:
    row_id = add(engine)
    claimed = claim(engine)
    assert claimed is not None and claimed.id == row_id
    assert claimed.state is OutboxState.SENDING and claimed.claimed_by == "w1" and claimed.attempts == 1
    assert claim(engine, "w2") is None  # nothing else is due
    with engine.begin() as conn:
        assert outbox.mark_sent(conn, row_id, claimer="w1", now=T0 + timedelta(seconds=1)) is None
    row = state(engine, row_id)
    assert row.state is OutboxState.SENT and row.sent_at == T0 + timedelta(seconds=1)


def test_a_reply_accepted_by_the_server_is_recorded_sent_whoever_holds_the_row(engine: Engine) -> None:
    row_id = add(engine)
    assert claim(engine) is not None
    with engine.begin() as conn:
        assert outbox.recover_interrupted(conn, now=T0, claimers=("w1",)) == ["ack"]
        # w1's server accepted the reply after all: it is sent, and no longer retryable.
        assert outbox.mark_sent(conn, row_id, claimer="w1", now=T0) is OutboxState.UNKNOWN
        assert not outbox.retry_reply(conn, row_id, now=T0)
    assert state(engine, row_id).state is OutboxState.SENT


def test_claim_order_and_due_time_and_action(engine: Engine) -> None:
    later = add(engine, "<later@x>", now=T0 + timedelta(minutes=5))
    first = add(engine, "<first@x>")
    draft = add(engine, "<draft@x>", action="draft")
    claimed = claim(engine)
    assert claimed is not None and claimed.id == first
    assert claim(engine) is None  # <later> is not due yet and drafts are not "send"
    claimed = claim(engine, now=T0 + timedelta(minutes=5))
    assert claimed is not None and claimed.id == later
    with engine.begin() as conn:
        claimed = outbox.claim_next(conn, claimer="w1", now=T0, action="draft")
    assert claimed is not None and claimed.id == draft


def test_transient_failures_back_off_then_fail(engine: Engine) -> None:
    row_id = add(engine)
    now = T0
    delays = []
    for attempt in range(1, 4):
        row = claim(engine, now=now)
        assert row is not None and row.attempts == attempt
        with engine.begin() as conn:
            new_state = outbox.mark_transient_failure(
                conn, row, claimer="w1", reason="421 try later", now=now, max_attempts=3
            )
        after = state(engine, row_id)
        if attempt < 3:
            assert new_state is OutboxState.PENDING and after.state is OutboxState.PENDING
            assert after.next_attempt_at is not None and after.claimed_by is None
            delays.append(after.next_attempt_at - now)
            assert claim(engine, now=after.next_attempt_at - timedelta(seconds=1)) is None
            now = after.next_attempt_at
        else:
            assert new_state is OutboxState.FAILED and after.state is OutboxState.FAILED
            assert after.last_error == "gave up after 3 attempts: 421 try later"
    assert delays == [timedelta(seconds=60), timedelta(seconds=120)]
    assert outbox.backoff_delay(30) == timedelta(hours=1)


def test_permanent_failure_keeps_reason(engine: Engine) -> None:
    row_id = add(engine)
    assert claim(engine) is not None
    with engine.begin() as conn:
        outbox.mark_failed(conn, row_id, claimer="w1", reason="RCPT TO: 550 no such user", now=T0)
    row = state(engine, row_id)
    assert row.state is OutboxState.FAILED and row.last_error == "RCPT TO: 550 no such user"


def test_interrupted_sends_become_unknown_and_are_not_resent(engine: Engine) -> None:
    mine, other = add(engine, "<a@x>"), add(engine, "<b@x>")
    assert claim(engine, "dead") is not None
    assert claim(engine, "alive") is not None
    with engine.begin() as conn:
        assert outbox.recover_interrupted(conn, now=T0, claimers=("dead",)) == ["ack"]
    assert state(engine, mine).state is OutboxState.UNKNOWN
    assert state(engine, other).state is OutboxState.SENDING
    with engine.begin() as conn:
        assert outbox.recover_interrupted(conn, now=T0, claimed_before=T0 - timedelta(minutes=1)) == []
        assert outbox.recover_interrupted(conn, now=T0, claimed_before=T0 + timedelta(minutes=1)) == ["ack"]
        with pytest.raises(ValueError):  # no filter: a live process's claim would be taken too
            outbox.recover_interrupted(conn, now=T0)
    assert state(engine, other).state is OutboxState.UNKNOWN
    assert claim(engine, now=T0 + timedelta(days=1)) is None
    assert "may or may not" in (state(engine, mine).last_error or "")


def test_operator_retry_and_cancel(engine: Engine) -> None:
    failed, unknown, sent, pending = (add(engine, f"<{n}@x>") for n in ("f", "u", "s", "p"))
    for row_id, end in ((failed, "failed"), (unknown, "unknown"), (sent, "sent")):
        with engine.begin() as conn:
            row = outbox.claim_next(conn, claimer="w1", now=T0)
            assert row is not None and row.id == row_id
            if end == "sent":
                outbox.mark_sent(conn, row_id, claimer="w1", now=T0)
            else:
                getattr(outbox, f"mark_{end}")(conn, row_id, claimer="w1", reason="x", now=T0)
    assert {r.id for r in _listed(engine, ("failed", "unknown"))} == {failed, unknown}
    with engine.begin() as conn:
        assert outbox.retry_reply(conn, failed, now=T0)
        assert outbox.retry_reply(conn, unknown, now=T0)
        assert not outbox.retry_reply(conn, sent, now=T0)
        assert not outbox.retry_reply(conn, pending, now=T0)
        assert outbox.cancel_reply(conn, pending, now=T0)
        assert not outbox.cancel_reply(conn, sent, now=T0)
    assert state(engine, failed).state is OutboxState.PENDING and state(engine, failed).attempts == 0
    assert state(engine, pending).state is OutboxState.CANCELLED
    assert [r.id for r in _listed(engine, None)] == [pending, sent, unknown, failed]


def _listed(engine: Engine, states: tuple[str, ...] | None) -> list[outbox.OutboxRow]:
    with engine.connect() as conn:
        return outbox.list_replies(conn, states=states, account=ACCOUNT)


def test_concurrent_claimers_never_share_a_row(engine: Engine) -> None:
    ids = {add(engine, f"<c{i}@x>") for i in range(30)}
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            row = claim(engine, name)
            if row is None:
                return
            with lock:
                claimed.append(row.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == sorted(ids)


def test_due_actions_tells_what_there_is_to_claim(engine: Engine) -> None:
    with engine.connect() as conn:
        assert outbox.due_actions(conn, now=T0) == set()
    add(engine, "<m1@x>", action="send")
    add(engine, "<m2@x>", action="draft", now=T0 + timedelta(minutes=5))
    with engine.connect() as conn:
        assert outbox.due_actions(conn, now=T0, account=ACCOUNT) == {"send"}
        assert outbox.due_actions(conn, now=T0 + timedelta(minutes=5)) == {"send", "draft"}
        assert outbox.due_actions(conn, now=T0, account="someone-else") == set()
    assert claim(engine) is not None
    with engine.connect() as conn:
        assert outbox.due_actions(conn, now=T0) == set()
