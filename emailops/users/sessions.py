"""Server-side sessions of the operator console: an opaque random id in the cookie, a row here.

Only the SHA-256 of the id is stored. ``find_session`` accepts a session within its idle limit
(since its last request) and its absolute limit (since sign-in), of a user who still exists and
is enabled, with the user's role as it is now; it ends any other. A password change, a disable
and a removal end the user's sessions (``end_user_sessions``, in the change's transaction).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, select, update

from emailops.store.database import reading
from emailops.store.schema import console_sessions, users
from emailops.users.credentials import digests_equal, token_digest
from emailops.users.permissions import Role

# A request moves its session's last request only when the one recorded is this old: a write (on
# SQLite the index's one write lock, which the daemon's indexing holds) per minute and session
# instead of per request; the idle timeout then ends a session at most this much early.
TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class SessionLimits:
    idle: timedelta
    absolute: timedelta


@dataclass(frozen=True)
class Session:
    user_name: str
    role: Role
    csrf_token: str
    created_at: datetime


def start_session(engine: Engine, user_name: str, source: str | None, now: datetime) -> tuple[str, Session]:
    """A new session of ``user_name``: its id (for the cookie, never stored) and the session."""
    session_id = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        role = conn.execute(select(users.c.role).where(users.c.name == user_name)).scalar_one()
        conn.execute(
            console_sessions.insert().values(
                id_hash=token_digest(session_id),
                user_name=user_name,
                csrf_token=csrf_token,
                source=source,
                created_at=now,
                last_seen_at=now,
            )
        )
    return session_id, Session(user_name=user_name, role=Role(role), csrf_token=csrf_token, created_at=now)


def find_session(engine: Engine, session_id: str, now: datetime, limits: SessionLimits) -> Session | None:
    """The live session with this id, its last request moved to ``now`` (when the one recorded is
    TOUCH_EVERY old or more); None (and the row gone) when it timed out or its user is gone or
    disabled."""
    digest = token_digest(session_id)
    with reading(engine) as conn:
        row = conn.execute(
            select(console_sessions, users.c.role, users.c.disabled)
            .join(users, users.c.name == console_sessions.c.user_name, isouter=True)
            .where(console_sessions.c.id_hash == digest)
        ).one_or_none()
    if row is None or not digests_equal(row.id_hash, digest):
        return None
    expired = now - row.last_seen_at > limits.idle or now - row.created_at > limits.absolute
    if expired or row.role is None or row.disabled:
        with engine.begin() as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.id_hash == digest))
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        with engine.begin() as conn:
            conn.execute(
                update(console_sessions).where(console_sessions.c.id_hash == digest).values(last_seen_at=now)
            )
    return Session(
        user_name=row.user_name, role=Role(row.role), csrf_token=row.csrf_token, created_at=row.created_at
    )


def session_alive(engine: Engine, session_id: str, now: datetime, limits: SessionLimits) -> bool:
    """Whether the session is live now, without counting this as a request (a page's open event
    stream must not keep its session from going idle)."""
    with engine.connect() as conn:
        row = conn.execute(
            select(console_sessions.c.last_seen_at, console_sessions.c.created_at, users.c.disabled)
            .join(users, users.c.name == console_sessions.c.user_name)
            .where(console_sessions.c.id_hash == token_digest(session_id))
        ).one_or_none()
    if row is None or row.disabled:
        return False
    idle: timedelta = now - row.last_seen_at
    age: timedelta = now - row.created_at
    return idle <= limits.idle and age <= limits.absolute


def end_session(engine: Engine, session_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(console_sessions).where(console_sessions.c.id_hash == token_digest(session_id)))


def end_user_sessions(conn: Connection, user_name: str) -> None:
    conn.execute(delete(console_sessions).where(console_sessions.c.user_name == user_name))
