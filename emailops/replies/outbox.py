"""The transactional outbox: replies are recorded with the decision, delivered later, exactly once.

States (column ``outbox.state``)::

    pending --claim--> sending --250--------------> sent        (from any state: it was delivered)
       ^                  |----5xx----------------> failed      (reason kept in last_error)
       |                  |----4xx / network------> pending     (next_attempt_at = now + backoff)
       |                  |    ... attempts == send_max_attempts -> failed
       |                  |----no answer after DATA-> unknown   (may have been delivered)
       |                  |----no IMAP slot (draft)-> pending     (the attempt not counted)
       |                  '----claimer died---------> unknown   (recover_interrupted)
       '--- retry (operator) --- failed | unknown
    pending | failed | unknown --cancel (operator)--> cancelled
    unknown --confirm sent (operator: it was delivered)--> sent

A reply is never sent while another claimer holds it: rows are claimed with ``store.work_queue``
(atomic; the claim's time by the database's clock; each outcome written only by the claimer and
attempt that hold the row). The claim is committed *before* the SMTP conversation, so a crash
during it leaves the row in ``sending``; ``recover_interrupted`` turns such rows into ``unknown``,
which only the operator can retry: a reply whose outcome is unknown is never resent blindly.
Backoff across restarts lives in ``next_attempt_at`` (the sending worker's clock: when a retry is
due, not who holds a claim); the delay comes from a tenacity wait strategy.

Functions that take a ``Connection`` run in the caller's transaction; ``deliver_next`` manages its
own two short transactions around the SMTP conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Unpack

import structlog
from sqlalchemy import ColumnElement, Connection, and_, func, or_, select, update
from tenacity import wait_exponential

from emailops.backoff import delay_seconds
from emailops.store import answer_queues, work_queue
from emailops.store.answer_queues import InboundReply, QueuedAnswer
from emailops.store.schema import outbox

# 1 min, 2, 4, 8, ... capped at one hour between attempts.
BACKOFF = wait_exponential(multiplier=60, min=60, max=3600)
MAX_ERROR_CHARS = 2000


class OutboxState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    UNKNOWN = "unknown"
    CANCELLED = "cancelled"


RETRYABLE = (OutboxState.FAILED, OutboxState.UNKNOWN)
CONFIRMABLE = (OutboxState.UNKNOWN,)
CANCELLABLE = (OutboxState.PENDING, OutboxState.FAILED, OutboxState.UNKNOWN)


def backoff_delay(attempts: int) -> timedelta:
    """The wait before the next try after ``attempts`` failed tries."""
    return timedelta(seconds=delay_seconds(BACKOFF, attempts))


@dataclass(frozen=True)
class OutboxRow(QueuedAnswer):
    state: OutboxState
    reply_message_id: str
    subject: str
    raw: bytes
    next_attempt_at: datetime | None
    sent_at: datetime | None

    @classmethod
    def from_mapping(cls, row: Any) -> OutboxRow:
        return answer_queues.row_as(cls, row, state=OutboxState(row["state"]), raw=bytes(row["raw"]))


QUEUE = work_queue.WorkQueue.on(outbox, pending=OutboxState.PENDING.value, working=OutboxState.SENDING.value)


def find_reply(conn: Connection, *, account: str, inbound_key: str, rule_name: str) -> int | None:
    return answer_queues.find_for_inbound(
        conn, outbox, account=account, inbound_key=inbound_key, rule_name=rule_name
    )


def insert_reply(
    conn: Connection,
    *,
    reply_message_id: str,
    subject: str,
    raw: bytes,
    now: datetime,
    **inbound: Unpack[InboundReply],
) -> tuple[int, bool]:
    """Record a pending reply; a no-op when (account, inbound_key, rule_name) exists.

    Returns ``(outbox id, created)``; ``created`` is False when the row was already there.
    """
    reply = {"reply_message_id": reply_message_id, "subject": subject, "raw": raw}
    return answer_queues.insert_for_inbound(conn, QUEUE, inbound, reply, now=now, due=now)


def get_reply(conn: Connection, outbox_id: int) -> OutboxRow | None:
    row = conn.execute(select(outbox).where(outbox.c.id == outbox_id)).mappings().first()
    return OutboxRow.from_mapping(row) if row else None


def _due(now: datetime, account: str | None) -> list[ColumnElement[bool]]:
    conditions = [outbox.c.state == OutboxState.PENDING.value, outbox.c.next_attempt_at <= now]
    if account is not None:
        conditions.append(outbox.c.account == account)
    return conditions


def due_actions(conn: Connection, *, now: datetime, account: str | None = None) -> set[str]:
    """The actions (``send``, ``draft``) with a row due now: a read, so that an idle worker's loop
    takes no write lock just to find there is nothing to claim."""
    return set(conn.execute(select(outbox.c.action).where(*_due(now, account)).distinct()).scalars())


def due_accounts(conn: Connection, *, now: datetime) -> set[str]:
    """The accounts for which ``due_actions`` finds a row due."""
    return set(conn.execute(select(outbox.c.account).where(*_due(now, None)).distinct()).scalars())


def claim_next(
    conn: Connection, *, claimer: str, now: datetime, action: str = "send", account: str | None = None
) -> OutboxRow | None:
    """Move the next due pending row to ``sending`` for ``claimer`` and return it, or ``None``.

    Commit right after: the claim must be durable before the SMTP conversation starts.
    """
    claim = work_queue.claim_next(
        conn,
        QUEUE,
        claimer,
        candidates=and_(*_due(now, account), outbox.c.action == action),
        order_by=(outbox.c.next_attempt_at, outbox.c.id),
        values={"updated_at": now},
    )
    return get_reply(conn, claim.row_id) if claim is not None else None


def _finish(
    conn: Connection, row_id: int, claimer: str, attempt: int | None, now: datetime, **values: Any
) -> bool:
    """Move a row out of ``sending``, only if ``claimer`` still holds it with claim ``attempt``
    (None: whichever attempt it holds now)."""
    if attempt is None:
        held = select(outbox.c.attempts).where(outbox.c.id == row_id)
        attempt = conn.execute(held).scalar_one_or_none()
        if attempt is None:
            return False
    claim = work_queue.Claim(row_id, claimer, attempt)
    return work_queue.settle(conn, QUEUE, claim, {"updated_at": now, **values})


def mark_sent(
    conn: Connection, row_id: int, *, claimer: str, now: datetime, attempt: int | None = None
) -> OutboxState | None:
    """Record that the server accepted the reply. It was delivered whatever the row says now, so
    the row ends ``sent`` even when ``claimer`` no longer holds it (another process found the claim
    stale and made it ``unknown``, or the operator cancelled it meanwhile): that keeps ``retry``
    from sending it again. Returns the state the row was in when it was not ours any more, else None.
    """
    sent = {"state": OutboxState.SENT.value, "sent_at": now, "last_error": None}
    if _finish(conn, row_id, claimer, attempt, now, **sent):
        return None
    previous = conn.execute(select(outbox.c.state).where(outbox.c.id == row_id)).scalar_one()
    conn.execute(update(outbox).where(outbox.c.id == row_id).values(updated_at=now, **sent))
    return OutboxState(previous)


def mark_failed(
    conn: Connection, row_id: int, *, claimer: str, reason: str, now: datetime, attempt: int | None = None
) -> bool:
    failed = {"state": OutboxState.FAILED.value, "last_error": reason[:MAX_ERROR_CHARS]}
    return _finish(conn, row_id, claimer, attempt, now, **failed)


def mark_unknown(
    conn: Connection, row_id: int, *, claimer: str, reason: str, now: datetime, attempt: int | None = None
) -> bool:
    unknown = {"state": OutboxState.UNKNOWN.value, "last_error": reason[:MAX_ERROR_CHARS]}
    return _finish(conn, row_id, claimer, attempt, now, **unknown)


def mark_transient_failure(
    conn: Connection, row: OutboxRow, *, claimer: str, reason: str, now: datetime, max_attempts: int
) -> OutboxState:
    """After a transient error: pending again with backoff, or failed once attempts are used up."""
    if row.attempts >= max_attempts:
        given_up = f"gave up after {row.attempts} attempts: {reason}"
        mark_failed(conn, row.id, claimer=claimer, reason=given_up, now=now, attempt=row.attempts)
        return OutboxState.FAILED
    _finish(
        conn,
        row.id,
        claimer,
        row.attempts,
        now,
        state=OutboxState.PENDING.value,
        claimed_by=None,
        last_error=reason[:MAX_ERROR_CHARS],
        next_attempt_at=now + backoff_delay(row.attempts),
    )
    return OutboxState.PENDING


def put_back(
    conn: Connection, row: OutboxRow, *, claimer: str, reason: str, now: datetime, delay: timedelta
) -> bool:
    """Nothing was tried (a draft found no IMAP connection slot free): pending again after
    ``delay``, the claim's attempt not counted."""
    return _finish(
        conn,
        row.id,
        claimer,
        row.attempts,
        now,
        state=OutboxState.PENDING.value,
        claimed_by=None,
        attempts=row.attempts - 1,
        last_error=reason[:MAX_ERROR_CHARS],
        next_attempt_at=now + delay,
    )


def count_by_state(conn: Connection, *, account: str | None = None) -> dict[str, int]:
    """How many replies are in each state (states without any are absent)."""
    query = select(outbox.c.state, func.count()).group_by(outbox.c.state)
    if account is not None:
        query = query.where(outbox.c.account == account)
    return {str(state): int(count) for state, count in conn.execute(query).all()}


def sending_claimers(conn: Connection) -> list[str]:
    """The distinct claimers of rows now in ``sending``."""
    return work_queue.working_claimers(conn, QUEUE, None)


def recover_interrupted(
    conn: Connection,
    *,
    now: datetime,
    claimers: tuple[str, ...] | None = None,
    claim_timeout: timedelta | None = None,
    claimed_before: datetime | None = None,
) -> list[str]:
    """Rows left in ``sending`` by dead claimers become ``unknown``; returns their rule names (one
    per row, for the metrics: an interrupted reply's outcome is unknown like an uncertain send's).

    Rows that any of these select: ``claimers``, claimed by those ids; ``claim_timeout``, claims
    older than that by the database's clock, by any claimer (a send never takes longer than the
    SMTP timeouts); ``claimed_before``, claims last changed before that moment of the caller's
    clock. One is required: while the service runs, a claim may belong to a live process.
    """
    if claimers is None and claim_timeout is None and claimed_before is None:
        raise ValueError("recover_interrupted needs claimers, claim_timeout or claimed_before")
    stale: list[ColumnElement[bool]] = []
    if claim_timeout is not None or claimers:
        stale.append(work_queue.stale(conn, QUEUE, claim_timeout=claim_timeout, dead_claimers=claimers or ()))
    if claimed_before is not None:
        sending = outbox.c.state == OutboxState.SENDING.value
        stale.append(sending & (outbox.c.updated_at < claimed_before))
    if not stale:
        return []
    rules = list(
        conn.execute(
            update(outbox)
            .where(or_(*stale))
            .values(
                state=OutboxState.UNKNOWN.value,
                last_error="interrupted while sending: the reply may or may not have been delivered",
                updated_at=now,
            )
            .returning(outbox.c.rule_name)
        ).scalars()
    )
    if rules:
        structlog.get_logger().warning(
            "outbox replies interrupted while sending are now unknown",
            component="smtp",
            count=len(rules),
        )
    return rules


def list_replies(
    conn: Connection,
    *,
    states: tuple[str, ...] | None = None,
    account: str | None = None,
    limit: int = 100,
) -> list[OutboxRow]:
    """Newest first, optionally only some states (operator listing)."""
    stmt = select(outbox)
    if states:
        stmt = stmt.where(outbox.c.state.in_(states))
    if account is not None:
        stmt = stmt.where(outbox.c.account == account)
    rows = conn.execute(stmt.order_by(outbox.c.id.desc()).limit(limit)).mappings().all()
    return [OutboxRow.from_mapping(r) for r in rows]


def retry_reply(conn: Connection, outbox_id: int, *, now: datetime, account: str | None = None) -> bool:
    """Operator: a failed or unknown reply of ``account``, not purged, goes back to pending with
    fresh attempts."""
    fresh = work_queue.retry_values(QUEUE) | {"next_attempt_at": now, "updated_at": now}
    allowed = [s.value for s in RETRYABLE]
    return work_queue.change_by_operator(
        conn,
        QUEUE,
        outbox_id,
        account=account,
        allowed=allowed,
        values=fresh,
        also=(outbox.c.purged_at.is_(None),),  # its text is gone (replies.history)
    )


def cancel_reply(conn: Connection, outbox_id: int, *, now: datetime, account: str | None = None) -> bool:
    """Operator: a pending, failed or unknown reply of ``account`` will never be sent (it stops
    counting to limits)."""
    cancelled = {"state": OutboxState.CANCELLED.value, "claimed_by": None, "updated_at": now}
    allowed = [s.value for s in CANCELLABLE]
    return work_queue.change_by_operator(
        conn, QUEUE, outbox_id, account=account, allowed=allowed, values=cancelled
    )


def confirm_sent(conn: Connection, outbox_id: int, *, now: datetime, account: str | None = None) -> bool:
    """Operator: an unknown reply of ``account`` was delivered (seen at the recipient's, or in the
    relay's log); it becomes sent and is never sent again. Its delivery time stays unknown."""
    sent = {"state": OutboxState.SENT.value, "claimed_by": None, "updated_at": now}
    allowed = [s.value for s in CONFIRMABLE]
    return work_queue.change_by_operator(
        conn, QUEUE, outbox_id, account=account, allowed=allowed, values=sent
    )
