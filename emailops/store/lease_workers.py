"""The workers sharing the folders' leases, each announced with its lease round.

A worker's share of the folders is the folder count divided by the live workers (``live_workers``).
A worker that holds no folder yet is counted too, so the others give folders up to it; one that
stopped (``leave``) or died (its row expired) is not. Times are the database's clock.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection, delete, select, update

from emailops.store.db_clock import db_now
from emailops.store.dialect import insert_unless_present
from emailops.store.schema import lease_workers

# Rows of workers gone longer than this are deleted by the others' announcements.
FORGET_AFTER = timedelta(hours=1)


def announce(conn: Connection, owner: str, ttl: timedelta) -> None:
    """``owner`` is live for ``ttl`` more (and the long-gone workers' rows are deleted)."""
    expires = db_now(conn, ttl)
    renewed = conn.execute(
        update(lease_workers).where(lease_workers.c.owner == owner).values(expires_at=expires)
    )
    if renewed.rowcount == 0:
        conn.execute(
            insert_unless_present(conn, lease_workers, ["owner"]).values(owner=owner, expires_at=expires)
        )
    conn.execute(delete(lease_workers).where(lease_workers.c.expires_at < db_now(conn, -FORGET_AFTER)))


def live_workers(conn: Connection) -> set[str]:
    """The owners of the workers live now."""
    live = select(lease_workers.c.owner).where(lease_workers.c.expires_at >= db_now(conn))
    return set(conn.execute(live).scalars())


def leave(conn: Connection, owner: str) -> None:
    """``owner`` stops: it is no longer counted in the others' shares."""
    conn.execute(delete(lease_workers).where(lease_workers.c.owner == owner))
