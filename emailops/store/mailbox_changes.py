"""Mailbox changes put off because the account had no IMAP connection slot free.

A rule's flags and move of a message, or the Sent copy of a reply, wait here until ``due_at`` (the
database's clock) and are then made by whichever worker serves the account first: ``take_due``
holds a row for ``hold`` with one conditional UPDATE, so two workers do not make it at once, and
a worker that died holding it leaves it due again after ``hold``. A row is deleted once its change
is made, or put off again (``put_off_again``) when there is still no slot. Nothing was sent to the
server for a row put off, so making it later does it once; a worker that died after making it and
before deleting it leaves it to be made again (flags set again, a move of a UID no longer there
moves nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from sqlalchemy import Connection, delete, insert, select, update

from emailops.store.db_clock import db_now
from emailops.store.schema import mailbox_changes as changes


@dataclass(frozen=True)
class PutOff:
    id: int
    message_pk: int | None
    outbox_id: int | None
    # [(kind, folder), ...] of ``replies.decisions.MailboxAction`` (empty for a Sent copy).
    actions: list[tuple[str, str | None]]
    replied: bool
    attempts: int


def put_off(
    conn: Connection,
    *,
    account: str,
    delay: timedelta,
    message_pk: int | None = None,
    actions: list[tuple[str, str | None]] | None = None,
    replied: bool = False,
    outbox_id: int | None = None,
) -> None:
    """Record a change of message ``message_pk`` (``actions``, ``replied``), or the Sent copy of
    reply ``outbox_id``, to be made after ``delay``."""
    conn.execute(
        insert(changes).values(
            account=account,
            message_pk=message_pk,
            outbox_id=outbox_id,
            actions=[list(action) for action in actions or []],
            replied=replied,
            attempts=1,
            due_at=db_now(conn, delay),
        )
    )


def take_due(
    conn: Connection, account: str, of: Literal["message", "sent_copy"], *, hold: timedelta, limit: int = 20
) -> list[PutOff]:
    """The due changes of ``account`` (messages' or Sent copies'), each held for ``hold`` by the
    caller (a row another worker took meanwhile is left out)."""
    kind = changes.c.message_pk.is_not(None) if of == "message" else changes.c.outbox_id.is_not(None)
    due = (changes.c.account == account) & kind & (changes.c.due_at <= db_now(conn))
    rows = conn.execute(select(changes).where(due).order_by(changes.c.id).limit(limit)).mappings().all()
    taken = []
    for row in rows:
        held = update(changes).where(changes.c.id == row["id"], due).values(due_at=db_now(conn, hold))
        if conn.execute(held).rowcount == 1:
            taken.append(
                PutOff(
                    id=row["id"],
                    message_pk=row["message_pk"],
                    outbox_id=row["outbox_id"],
                    actions=[(action, folder) for action, folder in row["actions"]],
                    replied=bool(row["replied"]),
                    attempts=row["attempts"],
                )
            )
    return taken


def accounts_due(conn: Connection) -> set[str]:
    """The accounts with a change due now (of any kind). Not DISTINCT: SQLite would walk the
    whole account index for it instead of the range of due rows (there are few)."""
    due = select(changes.c.account).where(changes.c.due_at <= db_now(conn))
    return set(conn.execute(due).scalars())


def put_off_again(conn: Connection, change_id: int, delay: timedelta) -> None:
    conn.execute(
        update(changes)
        .where(changes.c.id == change_id)
        .values(attempts=changes.c.attempts + 1, due_at=db_now(conn, delay))
    )


def done(conn: Connection, change_id: int) -> None:
    """The change was made, or will never be (its message is gone, its folder recreated...)."""
    conn.execute(delete(changes).where(changes.c.id == change_id))
