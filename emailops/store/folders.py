"""Per-folder sync state and the lease that says which worker watches a folder.

A lease is taken with one conditional UPDATE (free, ours, or expired), which is atomic on SQLite and
PostgreSQL alike, so N workers or N containers sharing one database never watch the same folder.
Lease times come from the database's clock (``db_clock``), never a host's. Each change of holder
raises the folder's ``lease_epoch``, the fencing token: the sync-state writes of a holder check
the epoch it was given (``fence``), so a holder that was paused (GC, SIGSTOP, a frozen VM) past
its lease and then resumed cannot write after another took over: ``LeaseLostError``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Update, and_, case, or_, select, update

from emailops.store.db_clock import db_now
from emailops.store.dialect import insert_unless_present
from emailops.store.schema import folders


class LeaseLostError(Exception):
    """Another worker took the folder's lease over: this one must stop writing its state."""


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
    insert = insert_unless_present(conn, folders, ["account", "name"]).values(account=account, name=name)
    conn.execute(insert)
    state = get_folder(conn, account, name)
    assert state is not None
    return state


_STATE_COLUMNS = (
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
)


def get_folder(conn: Connection, account: str, name: str) -> FolderState | None:
    row = conn.execute(
        select(*_STATE_COLUMNS).where(folders.c.account == account, folders.c.name == name)
    ).first()
    return FolderState(**row._mapping) if row else None


def list_folders(conn: Connection) -> list[FolderState]:
    """Every folder the index knows, by account and name."""
    rows = conn.execute(select(*_STATE_COLUMNS).order_by(folders.c.account, folders.c.name))
    return [FolderState(**row._mapping) for row in rows]


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
    fence: int | None = None,
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
    _write_state(conn, update(folders).where(folders.c.id == folder_id).values(**values), fence)


def touch_sync(conn: Connection, folder_id: int, now: datetime, fence: int | None = None) -> None:
    """A poll found nothing new: the folder is in sync as of ``now``."""
    _write_state(conn, update(folders).where(folders.c.id == folder_id).values(last_sync_at=now), fence)


def save_progress(conn: Connection, folder_id: int, *, uidnext: int, fence: int | None = None) -> None:
    """Record that every UID below ``uidnext`` is indexed (a pass in progress).

    The server's count is forgotten with it: the next pass tells expunges by comparing the count
    it sees with the last one plus the arrivals above ``uidnext``, and the last one was taken before
    this pass's arrivals. Kept, an interrupted pass followed by as many expunges as it had stored
    would look unchanged and leave the expunged messages live (seen in the crash harness); unknown,
    the next pass compares the UID lists.
    """
    statement = update(folders).where(folders.c.id == folder_id).values(uidnext=uidnext, server_count=None)
    _write_state(conn, statement, fence)


def _write_state(conn: Connection, statement: Update, fence: int | None) -> None:
    """Write the folder's sync state; with a ``fence``, only while the lease epoch is still it."""
    if fence is None:
        conn.execute(statement)
        return
    if conn.execute(statement.where(folders.c.lease_epoch == fence)).rowcount != 1:
        raise LeaseLostError(f"the folder's lease changed hands (epoch {fence} is over)")


def acquire_lease(
    conn: Connection, folder_id: int, owner: str, ttl: timedelta, *, replacing: str | None = None
) -> int | None:
    """Take or renew the folder's lease for ``owner``: the lease epoch it holds, or None while
    another live owner holds it. ``replacing`` names a holder known to be dead (a worker of this
    run that was replaced), whose lease is taken at once rather than after it expires."""
    takeable = [
        folders.c.lease_owner.is_(None),
        folders.c.lease_owner == owner,
        folders.c.lease_expires_at < db_now(conn),
    ]
    if replacing is not None:
        takeable.append(folders.c.lease_owner == replacing)
    # Renewing keeps the epoch; any change of holder raises it.
    epoch = case((folders.c.lease_owner == owner, folders.c.lease_epoch), else_=folders.c.lease_epoch + 1)
    return conn.execute(
        update(folders)
        .where(folders.c.id == folder_id, or_(*takeable))
        .values(lease_owner=owner, lease_expires_at=db_now(conn, ttl), lease_epoch=epoch)
        .returning(folders.c.lease_epoch)
    ).scalar_one_or_none()


@dataclass(frozen=True)
class FolderLease:
    """One folder's lease as a lease round sees it."""

    id: int
    account: str
    name: str
    owner: str | None
    # The lease has not expired (the database's clock).
    live: bool
    # No live lease, and neither a lease nor a sync for the round's ``unwatched_for``: nobody is
    # watching it. (``last_sync_at`` is written with the syncing host's clock: a skew shortens or
    # lengthens the wait for a released folder by as much.)
    orphaned: bool


def lease_view(conn: Connection, accounts: Collection[str], unwatched_for: timedelta) -> list[FolderLease]:
    """The leases of every folder of ``accounts`` (one statement, whatever their number)."""
    if not accounts:
        return []
    now, cutoff = db_now(conn), db_now(conn, -unwatched_for)
    live = and_(folders.c.lease_owner.is_not(None), folders.c.lease_expires_at >= now)
    expired_long_ago = and_(folders.c.lease_owner.is_not(None), folders.c.lease_expires_at < cutoff)
    released_long_ago = and_(folders.c.lease_owner.is_(None), folders.c.last_sync_at < cutoff)
    rows = conn.execute(
        select(
            folders.c.id,
            folders.c.account,
            folders.c.name,
            folders.c.lease_owner,
            case((live, True), else_=False).label("live"),
            case((or_(expired_long_ago, released_long_ago), True), else_=False).label("orphaned"),
        ).where(folders.c.account.in_(tuple(accounts)))
    )
    return [
        FolderLease(row.id, row.account, row.name, row.lease_owner, bool(row.live), bool(row.orphaned))
        for row in rows
    ]


def renew_leases(conn: Connection, owner: str, folder_ids: Collection[int], ttl: timedelta) -> dict[int, int]:
    """Extend ``owner``'s leases of ``folder_ids`` (one statement): the lease epoch of each it
    still holds; a folder missing from the answer was taken over by another (it expired)."""
    if not folder_ids:
        return {}
    renewed = conn.execute(
        update(folders)
        .where(folders.c.id.in_(tuple(folder_ids)), folders.c.lease_owner == owner)
        .values(lease_expires_at=db_now(conn, ttl))
        .returning(folders.c.id, folders.c.lease_epoch)
    )
    return {int(folder_id): int(epoch) for folder_id, epoch in renewed}


@dataclass(frozen=True)
class LiveLease:
    """A folder watched right now: who holds it and until when (the database's clock, UTC)."""

    folder: str
    owner: str
    expires_at: datetime


def live_lease(conn: Connection, account: str) -> LiveLease | None:
    """A lease on one of ``account``'s folders that has not expired, if any (the one that lasts
    longest): a daemon is watching the account."""
    row = conn.execute(
        select(folders.c.name, folders.c.lease_owner, folders.c.lease_expires_at)
        .where(
            folders.c.account == account,
            folders.c.lease_owner.is_not(None),
            folders.c.lease_expires_at >= db_now(conn),
        )
        .order_by(folders.c.lease_expires_at.desc())
        .limit(1)
    ).first()
    return None if row is None else LiveLease(row.name, row.lease_owner, row.lease_expires_at)


def release_lease(conn: Connection, folder_id: int, owner: str) -> None:
    conn.execute(
        update(folders)
        .where(and_(folders.c.id == folder_id, folders.c.lease_owner == owner))
        .values(lease_owner=None, lease_expires_at=None)
    )


def request_fetch(conn: Connection, account: str, name: str) -> bool:
    """Ask the worker that watches folder ``name`` of ``account`` to sync it now (False: no such
    folder in the index)."""
    stmt = update(folders).where(folders.c.account == account, folders.c.name == name)
    return conn.execute(stmt.values(fetch_requested_at=db_now(conn))).rowcount == 1


def take_fetch_requests(conn: Connection, folder_ids: Collection[int]) -> list[int]:
    """The folders among ``folder_ids`` whose sync was asked for, the requests cleared (a request
    made meanwhile, with a later time, stays)."""
    if not folder_ids:
        return []
    asked = conn.execute(
        select(folders.c.id, folders.c.fetch_requested_at).where(
            folders.c.id.in_(tuple(folder_ids)), folders.c.fetch_requested_at.is_not(None)
        )
    ).all()
    for folder_id, at in asked:
        conn.execute(
            update(folders)
            .where(folders.c.id == folder_id, folders.c.fetch_requested_at == at)
            .values(fetch_requested_at=None)
        )
    return [int(folder_id) for folder_id, _ in asked]
