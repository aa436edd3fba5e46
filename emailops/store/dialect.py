"""What differs between SQLite and PostgreSQL, for the modules that write outside ``store/``: they
ask these functions and never read ``conn.dialect`` themselves.

- An insert that yields to an existing row: ``INSERT .. ON CONFLICT (key) DO NOTHING`` (both),
  and ``insert_once`` on it, which also tells the id of the row that was there.
- Serialising writers: PostgreSQL takes locks (advisory transaction locks, ``FOR UPDATE``, with
  ``SKIP LOCKED`` for work queues); SQLite needs none, its write transaction (``BEGIN IMMEDIATE``,
  see ``database.py``) already excludes every other writer (``writer_is_exclusive``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    Integer,
    Select,
    Table,
    cast,
    func,
    literal,
    select,
    text,
)

from emailops.store.schema import Timestamp, sqlite_datetime

_Query = TypeVar("_Query", bound=Select[Any])


def insert_unless_present(conn: Connection, table: Table, key: Sequence[str]) -> Insert:
    """An INSERT into ``table`` that does nothing where a row with the same ``key`` (the columns of
    a unique constraint) exists; add ``.values(...)`` and, to learn what was inserted,
    ``.returning(...)``."""
    # Each dialect's module is imported when used: the PostgreSQL one alone is a tenth of a second
    # of every start on SQLite.
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(key))
    from sqlalchemy.dialects import postgresql

    return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(key))


def insert_once(
    conn: Connection, table: Table, key: Sequence[str], values: Mapping[str, object]
) -> tuple[int, bool]:
    """Insert ``values`` unless a row with the same ``key`` exists: ``(the row's id, created)``.

    The queues' at-most-once rows (a reply, a model's job per message and rule) are made this way:
    a decision run again finds the row its first run recorded."""
    new_id = conn.execute(
        insert_unless_present(conn, table, key).values(**values).returning(table.c.id)
    ).scalar_one_or_none()
    if new_id is not None:
        return int(new_id), True
    same_key = [table.c[name] == values[name] for name in key]
    return int(conn.execute(select(table.c.id).where(*same_key)).scalar_one()), False


def writer_is_exclusive(conn: Connection) -> bool:
    """Whether a write transaction excludes every other writer until it ends (SQLite), so that
    what it read of the rows it is about to write stays true until it commits."""
    return conn.dialect.name == "sqlite"


def locking(conn: Connection, query: _Query, *, skip_locked: bool = False) -> _Query:
    """``query`` that keeps the rows it reads locked until the transaction ends (PostgreSQL
    ``FOR UPDATE``; with ``skip_locked``, rows another transaction holds are passed over)."""
    if conn.dialect.name == "postgresql":
        return query.with_for_update(skip_locked=skip_locked)
    return query


def serialise_on(conn: Connection, key: str) -> None:
    """Until the transaction ends, other transactions that serialise on ``key`` wait (PostgreSQL
    advisory transaction lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})


def hours_since(conn: Connection, moment: ColumnElement[Any], start: datetime) -> ColumnElement[int]:
    """Whole hours from ``start`` to ``moment`` (a Timestamp column, not before ``start``): 0 in the
    first hour."""
    if conn.dialect.name == "sqlite":
        # Both UTC text (schema.sqlite_datetime); julianday counts days with a fraction, and a cast
        # of a non-negative number cuts it down (SQLite may be built without floor()).
        days = func.julianday(moment) - func.julianday(literal(sqlite_datetime(start)))
        return cast(days * 24, Integer)
    seconds = func.extract("epoch", moment - literal(start, Timestamp()))
    return cast(func.floor(seconds / 3600), Integer)
