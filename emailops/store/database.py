"""Engines for the index: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL (psycopg 3).

A SQLite file the project creates is readable by its owner only (0600): it holds everyone's mail.
SQLite gives the -wal and -shm files the database file's permissions. A file that exists already
(the operator's) keeps its mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

# How long a SQLite writer waits for another writer before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# The page cache of each SQLite connection, in KiB (PRAGMA cache_size=-N). It fills as the index
# grows and stays at this size: a long-running worker's memory holds this much per pooled
# connection (issue 14). In WAL mode a connection's cache is dropped whenever another connection
# has committed since its last transaction, so it serves only runs of work by one writer (a sync
# pass); what it misses comes from the OS page cache. SQLite's own default, chosen on purpose.
SQLITE_CACHE_KIB = 2000
# SQLite connections kept open in an engine's pool between uses (each with its page cache). A
# worker uses one at a time; more are opened when needed (SQLAlchemy's max_overflow) and closed
# on return, so the memory held at rest is bounded by this times SQLITE_CACHE_KIB.
SQLITE_POOL_SIZE = 2


# The mode of a SQLite file (index or backup) the project creates.
PRIVATE_FILE_MODE = 0o600


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 (an empty file is an empty SQLite database), unless it
    exists: then, or when another process creates it first, its mode is left as it is."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    os.close(descriptor)


def create_index_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; the SQLite file's directory is created when missing, and the file
    with mode 0600 (see the module's docstring)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            if not parsed.query.get("uri"):  # a file: URI names the file with its parameters
                create_private_file(Path(parsed.database))
            if "poolclass" not in kwargs:
                kwargs.setdefault("pool_size", SQLITE_POOL_SIZE)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun explicitly (see _sqlite_on_begin) so that writers take the lock up
    # front with BEGIN IMMEDIATE instead of failing on lock upgrade.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    # Readers use a deferred transaction (a WAL snapshot, no lock); everything else is a writer.
    read_only = connection.get_execution_options().get("read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only: on SQLite it takes no write lock, so it never waits for a writer."""
    with engine.connect() as conn:
        conn.execution_options(read_only=True)
        yield conn
