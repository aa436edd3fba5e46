"""Claimable rows: the one shape of the work queues (outbox, model jobs, rules stage).

A queue is a table whose rows move ``pending --claim--> working --settle--> (any state)``:

- A claim counts an attempt (``attempts + 1``) and stamps ``claimed_at`` with the database's
  clock (``store.db_clock``), never a host's: a worker whose clock is skewed cannot make another's
  claim look expired.
- The claim's fencing token is (claimer, attempt): a write of the claim's outcome (``settle``)
  applies only while the row is still ``working`` for that claimer and that attempt, so a worker
  that lost its claim (paused past the timeout, then claimed again by another) changes nothing.
- Claiming is atomic: PostgreSQL ``SELECT .. FOR UPDATE SKIP LOCKED`` then a conditional UPDATE;
  SQLite the conditional UPDATE inside the ``BEGIN IMMEDIATE`` transaction (``database.py``).
- A claim is stale when older than the queue's claim timeout (database clock) or held by a
  process known to be gone; what happens to stale rows is the queue's (retried, unknown, ...).
- The operator's retry and cancel change one row of one account, from the states allowed.

Functions take a ``Connection`` and run in the caller's transaction; commit a claim before the work.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Column, ColumnElement, Connection, Table, or_, select, update

from emailops.store.db_clock import db_now
from emailops.store.dialect import locking


@dataclass(frozen=True)
class WorkQueue:
    """Where a table keeps its claims. ``of_account`` selects one account's rows."""

    table: Table
    state: Column[Any]
    attempts: Column[Any]
    claimed_by: Column[Any]
    claimed_at: Column[Any]
    pending: str
    working: str
    of_account: Callable[[str], ColumnElement[bool]]

    @classmethod
    def on(
        cls,
        table: Table,
        *,
        pending: str,
        working: str,
        prefix: str = "",
        of_account: Callable[[str], ColumnElement[bool]] | None = None,
    ) -> WorkQueue:
        """The queue of ``table`` whose columns are named ``state``, ``attempts``, ``claimed_by``
        and ``claimed_at`` after ``prefix``; rows of an account by its ``account`` column unless
        ``of_account`` says otherwise."""
        columns = table.c
        return cls(
            table=table,
            state=columns[f"{prefix}state"],
            attempts=columns[f"{prefix}attempts"],
            claimed_by=columns[f"{prefix}claimed_by"],
            claimed_at=columns[f"{prefix}claimed_at"],
            pending=pending,
            working=working,
            of_account=of_account or (lambda account: columns.account == account),
        )

    @property
    def id(self) -> Column[Any]:
        return self.table.c.id


@dataclass(frozen=True)
class Claim:
    """A claim as its holder knows it: the fencing token of every write of its outcome."""

    row_id: int
    claimer: str | None
    attempt: int


def claim_next(
    conn: Connection,
    queue: WorkQueue,
    claimer: str | None,
    *,
    candidates: ColumnElement[bool],
    order_by: Sequence[ColumnElement[Any]],
    values: Mapping[str, object] | None = None,
) -> Claim | None:
    """Claim the first row (by ``order_by``) that meets ``candidates``, or None when there is none.
    ``values`` are written with the claim."""
    first = locking(conn, select(queue.id).where(candidates).order_by(*order_by).limit(1), skip_locked=True)
    row_id = conn.execute(first).scalar_one_or_none()
    if row_id is None:
        return None
    return claim_row(conn, queue, int(row_id), claimer, candidates=candidates, values=values)


def claim_row(
    conn: Connection,
    queue: WorkQueue,
    row_id: int,
    claimer: str | None,
    *,
    candidates: ColumnElement[bool],
    values: Mapping[str, object] | None = None,
) -> Claim | None:
    """Claim row ``row_id`` if it meets ``candidates`` now; None if not (another took it)."""
    attempt = conn.execute(
        update(queue.table)
        .where(queue.id == row_id, candidates)
        .values(
            {
                queue.state.name: queue.working,
                queue.attempts.name: queue.attempts + 1,
                queue.claimed_by.name: claimer,
                queue.claimed_at.name: db_now(conn),
                **(values or {}),
            }
        )
        .returning(queue.attempts)
    ).scalar_one_or_none()
    return Claim(row_id, claimer, int(attempt)) if attempt is not None else None


def holds(queue: WorkQueue, claim: Claim) -> ColumnElement[bool]:
    """The row while ``claim`` still holds it: working, same claimer, same attempt."""
    holder = queue.claimed_by.is_(None) if claim.claimer is None else queue.claimed_by == claim.claimer
    return (
        (queue.id == claim.row_id)
        & (queue.state == queue.working)
        & holder
        & (queue.attempts == claim.attempt)
    )


def settle(conn: Connection, queue: WorkQueue, claim: Claim, values: Mapping[str, object]) -> bool:
    """Write the outcome of ``claim``; False (nothing written) when the claim is no longer held."""
    return conn.execute(update(queue.table).where(holds(queue, claim)).values(**values)).rowcount == 1


def still_held(conn: Connection, queue: WorkQueue, claim: Claim) -> bool:
    """Lock and check the claim (PostgreSQL: the row stays locked until the transaction ends)."""
    return conn.execute(locking(conn, select(queue.id).where(holds(queue, claim)))).first() is not None


def stale(
    conn: Connection,
    queue: WorkQueue,
    *,
    claim_timeout: timedelta | None,
    dead_claimers: Collection[str] = (),
) -> ColumnElement[bool]:
    """Working rows whose claim is older than ``claim_timeout`` by the database's clock, or held by
    one of ``dead_claimers`` (processes known to be gone)."""
    given_up: list[ColumnElement[bool]] = []
    if claim_timeout is not None:
        given_up.append(queue.claimed_at < db_now(conn, -claim_timeout))
    if dead_claimers:
        given_up.append(queue.claimed_by.in_(tuple(dead_claimers)))
    if not given_up:
        raise ValueError("a stale claim needs a claim timeout or dead claimers")
    return (queue.state == queue.working) & or_(*given_up)


def working_claimers(conn: Connection, queue: WorkQueue, account: str | None) -> list[str]:
    """The distinct claimers of the rows being worked on now (of ``account``; None: of all)."""
    query = select(queue.claimed_by).where(queue.state == queue.working, queue.claimed_by.is_not(None))
    if account is not None:
        query = query.where(queue.of_account(account))
    return [str(claimer) for claimer in conn.execute(query.distinct()).scalars()]


def change_by_operator(
    conn: Connection,
    queue: WorkQueue,
    row_id: int,
    *,
    account: str | None,
    allowed: Collection[str],
    values: Mapping[str, object],
    also: Sequence[ColumnElement[bool]] = (),
) -> bool:
    """The operator's retry or cancel of one row: only a row of ``account`` in an ``allowed``
    state, meeting the conditions ``also``, changes (account None: whichever account, for callers
    that name the row alone)."""
    conditions: list[ColumnElement[bool]] = [queue.id == row_id, queue.state.in_(tuple(allowed)), *also]
    if account is not None:
        conditions.append(queue.of_account(account))
    return conn.execute(update(queue.table).where(*conditions).values(**values)).rowcount == 1


def retry_values(queue: WorkQueue) -> dict[str, object]:
    """What an operator's retry writes in every queue: pending, fresh attempts, no claimer. (A
    claim made before stays fenced by its claimer: a claimer works on one row at a time.)"""
    return {queue.state.name: queue.pending, queue.attempts.name: 0, queue.claimed_by.name: None}
