"""Failed console sign-ins, counted per user name and per client address.

A client address with ``max_failures`` failures within ``window`` is refused until the window
ends. A user name with ``max_failures`` failures within ``window`` is locked: refused until an
admin lifts the lockout (``lift_lockout``: the console's Users page, ``emailops users unlock``).
Names are counted whether a user has them or not, so a lockout tells nothing about who exists.
A success clears the name's count unless it is locked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, select, update

from emailops.audit import Actor, record
from emailops.store.dialect import insert_unless_present, locking
from emailops.store.schema import sign_in_failures

USER = "user"
SOURCE = "source"


@dataclass(frozen=True)
class ThrottlePolicy:
    max_failures: int = 20
    window: timedelta = timedelta(minutes=15)


def _row(conn: Connection, scope: str, key: str) -> tuple[int, datetime, bool] | None:
    row = conn.execute(
        select(sign_in_failures).where(sign_in_failures.c.scope == scope, sign_in_failures.c.key == key)
    ).one_or_none()
    return None if row is None else (row.failures, row.first_failure_at, bool(row.locked))


def refused(conn: Connection, name: str, source: str, now: datetime, policy: ThrottlePolicy) -> bool:
    """Whether a sign-in of ``name`` from ``source`` is refused before its password is looked at."""
    user = _row(conn, USER, name)
    if user is not None and user[2]:
        return True
    address = _row(conn, SOURCE, source)
    return address is not None and address[0] >= policy.max_failures and now - address[1] < policy.window


def _count(conn: Connection, scope: str, key: str, now: datetime, policy: ThrottlePolicy) -> bool:
    """One more failure for the key; True if it locked a user name now."""
    conn.execute(
        insert_unless_present(conn, sign_in_failures, ["scope", "key"]).values(
            scope=scope, key=key, failures=0, first_failure_at=now, locked=False
        )
    )
    where = (sign_in_failures.c.scope == scope, sign_in_failures.c.key == key)
    row = conn.execute(locking(conn, select(sign_in_failures).where(*where))).one()
    failures, first = (row.failures + 1, row.first_failure_at)
    if now - first >= policy.window and not row.locked:
        failures, first = 1, now
    lock = scope == USER and not row.locked and failures >= policy.max_failures
    conn.execute(
        update(sign_in_failures)
        .where(*where)
        .values(failures=failures, first_failure_at=first, locked=bool(row.locked) or lock)
    )
    return lock


def record_failure(engine: Engine, name: str, source: str, now: datetime, policy: ThrottlePolicy) -> bool:
    """Count a failed sign-in; True if it locked the user name (the caller records that)."""
    with engine.begin() as conn:
        _count(conn, SOURCE, source, now, policy)
        return _count(conn, USER, name, now, policy)


def record_success(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            delete(sign_in_failures).where(
                sign_in_failures.c.scope == USER,
                sign_in_failures.c.key == name,
                sign_in_failures.c.locked.is_(False),
            )
        )


def locked_names(conn: Connection) -> list[str]:
    query = select(sign_in_failures.c.key).where(
        sign_in_failures.c.scope == USER, sign_in_failures.c.locked.is_(True)
    )
    return list(conn.execute(query.order_by(sign_in_failures.c.key)).scalars())


def lift_lockout(engine: Engine, name: str, *, actor: Actor) -> bool:
    """Let ``name`` sign in again, its failures forgotten; False if it was not locked."""
    with engine.begin() as conn:
        where = (
            sign_in_failures.c.scope == USER,
            sign_in_failures.c.key == name,
            sign_in_failures.c.locked.is_(True),
        )
        if conn.execute(delete(sign_in_failures).where(*where)).rowcount == 0:
            return False
        record(conn, actor, "sign_in.unlock", name, before={"locked": True}, after={"locked": False})
    return True
