"""An account's IMAP connection budget, shared by every worker and container of the database.

An account has slots 0..N-1 (N = IMAP_MAX_CONNECTIONS); a connection is opened only by the holder
of a slot. A slot is taken with one conditional UPDATE (free or expired), atomic on SQLite and
PostgreSQL alike, so the workers together never hold more than N. Expiry times are the
database's clock (``db_clock``); a holder renews its slots with its folder leases, so the slots of
a worker that died are free once they expire.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta

from sqlalchemy import Connection, and_, func, or_, select, update

from emailops.store.db_clock import db_now
from emailops.store.dialect import insert_unless_present
from emailops.store.schema import imap_connection_slots as slots


def acquire_slot(conn: Connection, account: str, holder: str, budget: int, ttl: timedelta) -> int | None:
    """Take a free slot of ``account`` below ``budget`` for ``holder``: its number, or None when
    all are held."""
    missing = insert_unless_present(conn, slots, ["account", "slot"])
    for slot in range(budget):
        conn.execute(missing.values(account=account, slot=slot))
    free = or_(slots.c.holder.is_(None), slots.c.expires_at < db_now(conn))
    candidates = conn.execute(
        select(slots.c.slot)
        .where(slots.c.account == account, slots.c.slot < budget, free)
        .order_by(slots.c.slot)
    ).scalars()
    for slot in list(candidates):
        taken = conn.execute(
            update(slots)
            .where(slots.c.account == account, slots.c.slot == slot, free)
            .values(holder=holder, expires_at=db_now(conn, ttl))
        )
        if taken.rowcount == 1:
            return int(slot)
    return None


def renew_holder_slots(conn: Connection, holder: str, ttl: timedelta) -> dict[str, set[int]]:
    """Extend every slot ``holder`` holds, of every account (one statement): the slots it still
    holds by account (one it held and is not among them expired and was taken by another)."""
    renewed = conn.execute(
        update(slots)
        .where(slots.c.holder == holder)
        .values(expires_at=db_now(conn, ttl))
        .returning(slots.c.account, slots.c.slot)
    )
    held: dict[str, set[int]] = {}
    for account, slot in renewed:
        held.setdefault(account, set()).add(int(slot))
    return held


def release_slot(conn: Connection, account: str, holder: str, slot: int) -> None:
    conn.execute(
        update(slots)
        .where(and_(slots.c.account == account, slots.c.slot == slot, slots.c.holder == holder))
        .values(holder=None, expires_at=None)
    )


def slots_held(conn: Connection, accounts: Collection[str]) -> dict[str, int]:
    """How many of each account's slots are held now (by anyone); an account none of whose slots
    is held is missing."""
    if not accounts:
        return {}
    rows = conn.execute(
        select(slots.c.account, func.count())
        .where(
            slots.c.account.in_(tuple(accounts)),
            slots.c.holder.is_not(None),
            slots.c.expires_at >= db_now(conn),
        )
        .group_by(slots.c.account)
    )
    return {account: int(count) for account, count in rows}
