"""The operator's overview: per folder, whether it is watched and synced; what waits for the
operator (replies of unknown outcome, quarantined messages, model drafts pending or failed); and
the last 24 hours of mail indexed and replies sent, hour by hour.

What the index knows comes from the database; how each folder is watched now (IDLE or polling) and
its last error come from the workers (``FolderStatus``, which the caller reads where the workers
report it), matched by account and folder name (by folder name alone for a report that names no
account).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from sqlalchemy import Column, Connection, func, select

from emailops.imap.watcher import FolderStatus
from emailops.store.dialect import hours_since
from emailops.store.messages import FolderStats, folder_stats
from emailops.store.schema import folders, index_quarantine, llm_jobs, messages, outbox

HOURS = 24


@dataclass(frozen=True)
class FolderOverview:
    account: str
    folder: str
    # Indexed and still on the server.
    messages: int
    # The last complete pass (the index's record).
    last_sync_at: datetime | None
    # "idle", "polling", or None: no worker reports watching it now.
    mode: str | None
    # The last error in full, while it is current (after the last sync), and when.
    error: str | None
    error_at: datetime | None
    # A "fetch now" not taken by its worker yet.
    fetch_requested_at: datetime | None


@dataclass(frozen=True)
class Overview:
    folders: list[FolderOverview]
    outbox_unknown: int
    quarantined: int
    drafts_pending: int
    drafts_failed: int
    # HOURS numbers each, oldest hour first; the last is the hour now under way.
    indexed_per_hour: list[int]
    replies_sent_per_hour: list[int]


def overview(conn: Connection, *, watching: Sequence[FolderStatus], now: datetime) -> Overview:
    """The overview of every account in the index as of ``now``; ``watching``: what the workers
    report of the folders they watch."""
    reported = {(status.account, status.folder): status for status in watching}
    accounts = conn.execute(select(folders.c.account).distinct().order_by(folders.c.account)).scalars().all()
    requested = {
        (account, name): at
        for account, name, at in conn.execute(
            select(folders.c.account, folders.c.name, folders.c.fetch_requested_at)
        )
    }
    rows = [
        _folder(
            account,
            stats,
            reported.get((account, stats.name)) or reported.get((None, stats.name)),
            requested[(account, stats.name)],
        )
        for account in accounts
        for stats in folder_stats(conn, account)
    ]
    jobs = _count_by(conn, llm_jobs.c.state)
    quarantined = (
        conn.execute(select(func.count()).select_from(index_quarantine)).scalar_one()
        + conn.execute(select(func.count()).where(messages.c.rules_state == "quarantined")).scalar_one()
    )
    start = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS - 1)
    return Overview(
        folders=rows,
        outbox_unknown=_count_by(conn, outbox.c.state).get("unknown", 0),
        quarantined=int(quarantined),
        drafts_pending=jobs.get("pending", 0) + jobs.get("working", 0),
        drafts_failed=jobs.get("failed", 0),
        indexed_per_hour=_per_hour_ranges(conn, messages.c.indexed_at, start),
        replies_sent_per_hour=_per_hour(conn, outbox.c.sent_at, start),
    )


def _folder(
    account: str, stats: FolderStats, status: FolderStatus | None, requested: datetime | None
) -> FolderOverview:
    current = (
        status is not None
        and status.error_at is not None
        and (status.last_sync_at is None or status.error_at >= status.last_sync_at)
    )
    return FolderOverview(
        account=account,
        folder=stats.name,
        messages=stats.messages,
        last_sync_at=stats.last_sync,
        mode=status.mode if status is not None else None,
        error=status.error if current and status is not None else None,
        error_at=datetime.fromtimestamp(status.error_at, UTC)
        if current and status and status.error_at
        else None,
        fetch_requested_at=requested,
    )


def _count_by(conn: Connection, state: Column[str]) -> dict[str, int]:
    return {str(s): int(n) for s, n in conn.execute(select(state, func.count()).group_by(state))}


def _per_hour_ranges(conn: Connection, moment: Column[datetime], start: datetime) -> list[int]:
    """One count per hour, each over its range of ``moment``'s index: a day of 100,000 messages
    costs a walk of index entries, where grouping by a computed hour read and computed every row
    (bench/README.md "Console")."""
    bounds = [start + timedelta(hours=n) for n in range(HOURS + 1)]
    counts = [
        select(func.count()).where(moment >= low, moment < high).scalar_subquery()
        for low, high in pairwise(bounds)
    ]
    return [int(n) for n in conn.execute(select(*counts)).one()]


def _per_hour(conn: Connection, moment: Column[datetime], start: datetime) -> list[int]:
    hour = hours_since(conn, moment, start).label("hour")
    counted = conn.execute(select(hour, func.count()).where(moment >= start).group_by(hour)).all()
    hours = [0] * HOURS
    for index, count in counted:
        if 0 <= index < HOURS:
            hours[index] = int(count)
    return hours
