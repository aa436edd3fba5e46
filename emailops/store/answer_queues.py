"""What the queues that answer mail (the outbox, the model's jobs) share: one row per (account,
inbound message, rule), found and inserted alike, and the columns every such row has."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from sqlalchemy import Connection, Table, select

from emailops.store.dialect import insert_once
from emailops.store.work_queue import WorkQueue

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Row = TypeVar("_Row", bound="DataclassInstance")

# The queues that answer mail keep one row per (account, inbound message, rule): a decision run
# again finds the row its first run recorded, so a message is never answered twice by a rule.
INBOUND_KEY = ("account", "inbound_key", "rule_name")


class InboundReply(TypedDict):
    """What a new row of a queue that answers mail says of the answer: its key (which account,
    inbound message and rule), the inbound message's row in the index (while it exists), the
    action (``send`` or ``draft``) and to whom."""

    account: str
    inbound_key: str
    rule_name: str
    message_pk: int | None
    action: str
    recipient: str


@dataclass(frozen=True)
class QueuedAnswer:
    """The columns every queue that answers mail has, as a row is read (in the tables' order)."""

    id: int
    account: str
    inbound_key: str
    message_pk: int | None
    rule_name: str
    action: str
    recipient: str
    attempts: int
    last_error: str | None
    claimed_by: str | None
    created_at: datetime
    updated_at: datetime


def row_as(cls: type[_Row], row: Mapping[str, Any], **converted: object) -> _Row:
    """``cls`` (a dataclass of a queue's rows) from ``row``: each field from the column of its
    name, the fields in ``converted`` as given."""
    values = {field.name: row[field.name] for field in fields(cls) if field.name not in converted}
    return cls(**values, **converted)


def find_for_inbound(
    conn: Connection, table: Table, *, account: str, inbound_key: str, rule_name: str
) -> int | None:
    """The id of the row of ``table`` for this inbound message and rule, if there is one."""
    key = dict(zip(INBOUND_KEY, (account, inbound_key, rule_name), strict=True))
    return conn.execute(
        select(table.c.id).where(*(table.c[name] == value for name, value in key.items()))
    ).scalar_one_or_none()


def insert_for_inbound(
    conn: Connection,
    queue: WorkQueue,
    inbound: InboundReply,
    values: Mapping[str, object],
    *,
    now: datetime,
    due: object,
) -> tuple[int, bool]:
    """Record a pending row, due at ``due``, unless the inbound message and rule have one:
    ``(the row's id, created)``. The recipient is kept lower-case."""
    fresh = {
        queue.state.name: queue.pending,
        queue.attempts.name: 0,
        "recipient": inbound["recipient"].lower(),
        "next_attempt_at": due,
        "created_at": now,
        "updated_at": now,
    }
    return insert_once(conn, queue.table, INBOUND_KEY, {**inbound, **values, **fresh})
