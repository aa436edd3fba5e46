"""The queue of model calls: one job per (account, inbound message, rule), claimed like the outbox.

States (column ``llm_jobs.state``)::

    pending --claim (attempts + 1, a budget slot)--> working --reply written--> done (outbox_id)
       ^                                                |----timeout / 429 / 5xx--> pending (backoff)
       |                                                |    ... attempts == max --> failed
       |                                                |----refused (4xx, bad answer)-> failed
       |                                                '----worker died: claim expires, claimed again
       '--- retry (operator) --- failed                  pending | failed --cancel--> cancelled

Jobs are claimed with ``store.work_queue``: atomically, timed by the database's clock, the
attempt counted when claimed and, with the claimer, the claim's fencing token: a worker that lost
its claim (it was paused past the claim timeout) cannot finish the job. A job is done in the same transaction
that records its reply in the outbox, whose unique key on (account, inbound message, rule) keeps
it to one reply even if two workers both got an answer.

The hourly budget (``LLM_MAX_REQUESTS_PER_HOUR``) is a row per call started in ``llm_calls``,
counted in the claim's transaction; on PostgreSQL an advisory lock per account serialises claims,
so N workers never start more calls than the budget. Over it, jobs stay pending.

Functions take a ``Connection`` and run in the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Unpack

from sqlalchemy import ColumnElement, Connection, delete, func, insert, or_, select, update

from emailops.store import answer_queues, work_queue
from emailops.store.answer_queues import InboundReply, QueuedAnswer
from emailops.store.db_clock import db_now
from emailops.store.dialect import serialise_on
from emailops.store.schema import llm_calls, llm_jobs

MAX_ERROR_CHARS = 2000
BUDGET_WINDOW = timedelta(hours=1)


class JobState(StrEnum):
    PENDING = "pending"
    WORKING = "working"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Jobs that still stand for a reply (limits count them like outbox rows; done ones have their row).
OPEN_STATES = (JobState.PENDING, JobState.WORKING, JobState.FAILED)


@dataclass(frozen=True)
class LlmJob(QueuedAnswer):
    subject: str | None
    prompt: str
    model: str
    max_tokens: int
    temperature: float | None
    state: JobState
    next_attempt_at: datetime
    outbox_id: int | None

    @classmethod
    def from_mapping(cls, row: Any) -> LlmJob:
        return answer_queues.row_as(cls, row, state=JobState(row["state"]))


QUEUE = work_queue.WorkQueue.on(llm_jobs, pending=JobState.PENDING.value, working=JobState.WORKING.value)


def insert_job(
    conn: Connection,
    *,
    subject: str | None,
    prompt: str,
    model: str,
    max_tokens: int,
    temperature: float | None,
    now: datetime,
    **inbound: Unpack[InboundReply],
) -> tuple[int, bool]:
    """Record a pending job; a no-op when (account, inbound_key, rule_name) exists.
    Returns ``(job id, created)``."""
    call = {
        "subject": subject,
        "prompt": prompt,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    return answer_queues.insert_for_inbound(conn, QUEUE, inbound, call, now=now, due=db_now(conn))


def get_job(conn: Connection, job_id: int) -> LlmJob | None:
    row = conn.execute(select(llm_jobs).where(llm_jobs.c.id == job_id)).mappings().first()
    return LlmJob.from_mapping(row) if row else None


def _pending_due(conn: Connection) -> ColumnElement[bool]:
    return (llm_jobs.c.state == JobState.PENDING.value) & (llm_jobs.c.next_attempt_at <= db_now(conn))


def _claimable(
    conn: Connection, account: str, claim_timeout: timedelta, dead_claimers: tuple[str, ...]
) -> ColumnElement[bool]:
    """Pending and due, or a claim of a worker that died or hung mid-call."""
    stale = work_queue.stale(conn, QUEUE, claim_timeout=claim_timeout, dead_claimers=dead_claimers)
    return (llm_jobs.c.account == account) & or_(_pending_due(conn), stale)


def has_due(conn: Connection, *, account: str, claim_timeout: timedelta) -> bool:
    """A read: is a job due (an idle worker's loop takes no write lock to find there is none)."""
    due = select(llm_jobs.c.id).where(_claimable(conn, account, claim_timeout, ())).limit(1)
    return conn.execute(due).first() is not None


def accounts_maybe_due(conn: Connection) -> set[str]:
    """The accounts with a job pending and due, or one being worked on: whether that claim is
    stale (``has_due``) or its claimer gone (``processes.is_dead_sibling``) is the stage's to tell."""
    working = llm_jobs.c.state == JobState.WORKING.value
    query = select(llm_jobs.c.account).where(or_(_pending_due(conn), working))
    return set(conn.execute(query.distinct()).scalars())


def working_claimers(conn: Connection, *, account: str) -> list[str]:
    return work_queue.working_claimers(conn, QUEUE, account)


def lock_budget(conn: Connection, *, account: str) -> None:
    """Serialise claims of the account's jobs until the transaction ends (PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` already does), so the budget is counted and spent by one worker at a time."""
    serialise_on(conn, f"emailops.llm-budget:{account}")


def calls_in_last_hour(conn: Connection, *, account: str) -> int:
    return conn.execute(
        select(func.count())
        .select_from(llm_calls)
        .where(llm_calls.c.account == account, llm_calls.c.started_at > db_now(conn, -BUDGET_WINDOW))
    ).scalar_one()


def give_up_stale(
    conn: Connection,
    *,
    account: str,
    claim_timeout: timedelta,
    dead_claimers: tuple[str, ...],
    max_attempts: int,
) -> int:
    """Stale claims that used up their attempts fail (a job that hangs or kills the worker every
    time must not cost calls for ever). Returns how many."""
    stale = work_queue.stale(conn, QUEUE, claim_timeout=claim_timeout, dead_claimers=dead_claimers)
    return conn.execute(
        update(llm_jobs)
        .where(llm_jobs.c.account == account, stale, llm_jobs.c.attempts >= max_attempts)
        .values(
            state=JobState.FAILED.value,
            claimed_by=None,
            last_error=f"gave up after {max_attempts} attempts: the worker died or hung during the call",
            updated_at=db_now(conn),
        )
    ).rowcount


def claim_next(
    conn: Connection,
    *,
    account: str,
    claimer: str,
    claim_timeout: timedelta,
    dead_claimers: tuple[str, ...] = (),
) -> LlmJob | None:
    """Claim the next due job (pending and due, or a stale claim) for ``claimer`` and record the call
    in the budget. The caller checks the budget first, under ``lock_budget``. Commit right after."""
    claim = work_queue.claim_next(
        conn,
        QUEUE,
        claimer,
        candidates=_claimable(conn, account, claim_timeout, dead_claimers),
        order_by=(llm_jobs.c.next_attempt_at, llm_jobs.c.id),
        values={"updated_at": db_now(conn)},
    )
    if claim is None:
        return None
    conn.execute(insert(llm_calls).values(account=account, started_at=db_now(conn)))
    conn.execute(delete(llm_calls).where(llm_calls.c.started_at < db_now(conn, -2 * BUDGET_WINDOW)))
    return get_job(conn, claim.row_id)


def _claim(job: LlmJob) -> work_queue.Claim:
    return work_queue.Claim(job.id, job.claimed_by, job.attempts)


def mark_done(conn: Connection, job: LlmJob, *, outbox_id: int) -> bool:
    """In the transaction that recorded the reply; False when the claim is no longer ours."""
    done = {"state": JobState.DONE.value, "outbox_id": outbox_id, "last_error": None}
    return work_queue.settle(conn, QUEUE, _claim(job), {**done, "updated_at": db_now(conn)})


def still_claimed(conn: Connection, job: LlmJob) -> bool:
    """Lock and check the claim (PostgreSQL: the row stays locked until the transaction ends)."""
    return work_queue.still_held(conn, QUEUE, _claim(job))


def mark_failed(conn: Connection, job: LlmJob, *, reason: str) -> bool:
    failed = {"state": JobState.FAILED.value, "claimed_by": None, "last_error": reason[:MAX_ERROR_CHARS]}
    return work_queue.settle(conn, QUEUE, _claim(job), {**failed, "updated_at": db_now(conn)})


def mark_retry(
    conn: Connection, job: LlmJob, *, reason: str, delay: timedelta, max_attempts: int
) -> JobState:
    """After a transient error: pending again after ``delay``, or failed once attempts are used up."""
    if job.attempts >= max_attempts:
        mark_failed(conn, job, reason=f"gave up after {job.attempts} attempts: {reason}")
        return JobState.FAILED
    work_queue.settle(
        conn,
        QUEUE,
        _claim(job),
        {
            "state": JobState.PENDING.value,
            "claimed_by": None,
            "last_error": reason[:MAX_ERROR_CHARS],
            "next_attempt_at": db_now(conn, delay),
            "updated_at": db_now(conn),
        },
    )
    return JobState.PENDING


def list_jobs(
    conn: Connection, *, account: str, states: tuple[str, ...] | None = None, limit: int = 100
) -> list[LlmJob]:
    """Newest first (operator listing)."""
    stmt = select(llm_jobs).where(llm_jobs.c.account == account)
    if states:
        stmt = stmt.where(llm_jobs.c.state.in_(states))
    rows = conn.execute(stmt.order_by(llm_jobs.c.id.desc()).limit(limit)).mappings().all()
    return [LlmJob.from_mapping(r) for r in rows]


def retry_job(conn: Connection, job_id: int, *, account: str) -> bool:
    """Operator: a failed job, not purged, is asked of the model again, with fresh attempts."""
    fresh = work_queue.retry_values(QUEUE) | {"next_attempt_at": db_now(conn), "updated_at": db_now(conn)}
    return work_queue.change_by_operator(
        conn,
        QUEUE,
        job_id,
        account=account,
        allowed=(JobState.FAILED.value,),
        values=fresh,
        also=(llm_jobs.c.purged_at.is_(None),),  # its prompt is gone (replies.history)
    )


def cancel_job(conn: Connection, job_id: int, *, account: str) -> bool:
    """Operator: a pending or failed job is never asked (it stops counting to the reply limits)."""
    cancelled = {"state": JobState.CANCELLED.value, "claimed_by": None, "updated_at": db_now(conn)}
    allowed = (JobState.PENDING.value, JobState.FAILED.value)
    return work_queue.change_by_operator(
        conn, QUEUE, job_id, account=account, allowed=allowed, values=cancelled
    )
