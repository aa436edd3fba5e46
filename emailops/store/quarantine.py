"""What the operator is told of a message set aside because a stage kept failing on it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, Table, func, select

from emailops.store.schema import folders

# A quarantine reason is kept to this length (it may quote an exception's text).
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class QuarantinedMessage:
    """``row_id`` is the row of the stage's table (``index_quarantine``, or ``messages`` for the
    rules stage): what the operator's retry and release name."""

    row_id: int
    folder: str
    uidvalidity: int
    uid: int
    message_id: str | None
    attempts: int
    reason: str


def set_aside(
    conn: Connection, table: Table, *, attempts: str, reason: str, where: ColumnElement[bool]
) -> list[QuarantinedMessage]:
    """The messages ``where`` selects in ``table`` (a row a message, with its ``folder_id``,
    ``uidvalidity``, ``uid`` and ``message_id``), in the order they were set aside. ``attempts``
    and ``reason`` name the table's columns of the attempts made and the reason kept."""
    columns = table.c
    rows = conn.execute(
        select(
            columns.id,
            folders.c.name,
            columns.uidvalidity,
            columns.uid,
            columns.message_id,
            columns[attempts],
            func.coalesce(columns[reason], ""),
        )
        .join_from(table, folders, folders.c.id == columns.folder_id)
        .where(where)
        .order_by(columns.id)
    ).all()
    return [QuarantinedMessage(*row) for row in rows]
