"""Per-folder sync state and the lease that says which worker watches a folder.

A lease is taken with one conditional UPDATE (free, ours, or expired), which is atomic on SQLite and
PostgreSQL alike, so N workers or N containers sharing one database never watch the same folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Insert, and_, or_, select, update

from emailops.store.schema import folders


@dataclass(frozen=True)
class FolderState:
    id: int
    account: str
    name: str
    uidvalidity: int | None
    uidnext: int | None
    highestmodseq: int | None
    server_count: int | None
    baseline_uidnext: int | None
    last_sync_at: datetime | None
    last_reconcile_at: datetime | None


def ensure_folder(conn: Connection, account: str, name: str) -> FolderState:
    """The folder's row, created when missing (safe against a concurrent creator)."""
    state = get_folder(conn, account, name)
    if state is not None:
        return state
    insert = _insert_ignore(conn).values(account=account, name=name)
    conn.execute(insert)
    state = get_folder(conn, account, name)
    assert state is not None
    return state


def _insert_ignore(conn: Connection) -> Insert:
    # Each dialect's module is imported when used: the PostgreSQL one alone is a tenth of a
    # second of every start on SQLite.
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(folders).on_conflict_do_nothing(index_elements=["account", "name"])
    from sqlalchemy.dialects import postgresql

    return postgresql.insert(folders).on_conflict_do_nothing(index_elements=["account", "name"])


def get_folder(conn: Connection, account: str, name: str) -> FolderState | None:
    row = conn.execute(
        select(
            folders.c.id,
            folders.c.account,
            folders.c.name,
            folders.c.uidvalidity,
            folders.c.uidnext,
            folders.c.highestmodseq,
            folders.c.server_count,
            folders.c.baseline_uidnext,
            folders.c.last_sync_at,
            folders.c.last_reconcile_at,
        ).where(folders.c.account == account, folders.c.name == name)
    ).first()
    return FolderState(**row._mapping) if row else None


def save_sync_state(
    conn: Connection,
    folder_id: int,
    *,
    uidvalidity: int,
    uidnext: int | None,
    highestmodseq: int | None,
    now: datetime,
    server_count: int | None = None,
    baseline_uidnext: int | None = None,
    reconciled: bool = False,
) -> None:
    values: dict[str, object] = {
        "uidvalidity": uidvalidity,
        "uidnext": uidnext,
        "highestmodseq": highestmodseq,
        "server_count": server_count,
        "last_sync_at": now,
    }
    if baseline_uidnext is not None:
        values["baseline_uidnext"] = baseline_uidnext
        values["first_synced_at"] = now
    if reconciled:
        values["last_reconcile_at"] = now
    conn.execute(update(folders).where(folders.c.id == folder_id).values(**values))


def touch_sync(conn: Connection, folder_id: int, now: datetime) -> None:
    """A poll found nothing new: the folder is in sync as of ``now``."""
    conn.execute(update(folders).where(folders.c.id == folder_id).values(last_sync_at=now))


def save_progress(conn: Connection, folder_id: int, *, uidnext: int) -> None:
    """Record that every UID below ``uidnext`` is indexed (a pass in progress)."""
    conn.execute(update(folders).where(folders.c.id == folder_id).values(uidnext=uidnext))


def acquire_lease(conn: Connection, folder_id: int, owner: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew the folder's lease for ``owner``; False while another live owner holds it."""
    result = conn.execute(
        update(folders)
        .where(
            folders.c.id == folder_id,
            or_(
                folders.c.lease_owner.is_(None),
                folders.c.lease_owner == owner,
                folders.c.lease_expires_at < now,
            ),
        )
        .values(lease_owner=owner, lease_expires_at=now + ttl)
    )
    return result.rowcount == 1


def is_orphaned(conn: Connection, folder_id: int, cutoff: datetime) -> bool:
    """No live lease, and neither a lease nor a sync since ``cutoff``: nobody is watching it."""
    row = conn.execute(
        select(folders.c.lease_owner, folders.c.lease_expires_at, folders.c.last_sync_at).where(
            folders.c.id == folder_id
        )
    ).first()
    if row is None:
        return False
    owner, expires, last_sync = row
    if owner is not None:
        return expires is not None and _utc(expires) < cutoff
    return last_sync is not None and _utc(last_sync) < cutoff


def _utc(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def release_lease(conn: Connection, folder_id: int, owner: str) -> None:
    conn.execute(
        update(folders)
        .where(and_(folders.c.id == folder_id, folders.c.lease_owner == owner))
        .values(lease_owner=None, lease_expires_at=None)
    )
