"""When a login to an IMAP host may start, so that all workers and containers together log in to
one host no faster than a rate (IMAP_LOGINS_PER_SECOND).

Each login reserves the host's next free moment and moves it on by one interval, in one
transaction holding the host's row (PostgreSQL ``FOR UPDATE``; SQLite's write transaction
excludes every other writer), by the database's clock: 500 accounts starting at once get 500
moments one interval apart, whichever process each runs in.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, select, type_coerce, update

from emailops.store.db_clock import db_now
from emailops.store.dialect import insert_unless_present, locking
from emailops.store.schema import Timestamp
from emailops.store.schema import imap_login_pacing as pacing


def reserve_login(conn: Connection, host: str, interval: timedelta) -> timedelta:
    """Reserve the next login to ``host``: how long to wait before it (zero: at once)."""
    now = _now(conn)
    conn.execute(insert_unless_present(conn, pacing, ["host"]).values(host=host, next_login_at=now))
    next_at: datetime = conn.execute(
        locking(conn, select(pacing.c.next_login_at).where(pacing.c.host == host))
    ).scalar_one()
    start = max(now, next_at)
    conn.execute(update(pacing).where(pacing.c.host == host).values(next_login_at=start + interval))
    return start - now


def _now(conn: Connection) -> datetime:
    moment: datetime = conn.execute(select(type_coerce(db_now(conn), Timestamp()))).scalar_one()
    return moment
