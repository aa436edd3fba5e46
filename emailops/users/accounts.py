"""Console users: one function per action, called by the command line and by the console alike.

Each change (add, disable, enable, remove, password, API token) is made and recorded in the audit
log in one transaction, with the ``Actor`` who made it; ``before``/``after`` name the role and the
disabled flag, never a password, a hash or a token. Sign-in checks (``verify_sign_in``,
``verify_api_token``) change nothing but an outdated password hash and record nothing: the console
records sign-ins with the client's address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.exc import IntegrityError

from emailops.audit import Actor, record
from emailops.clock import Clock, utc_now
from emailops.store.dialect import locking
from emailops.store.schema import users
from emailops.users import credentials
from emailops.users.permissions import Role
from emailops.users.sessions import end_user_sessions

# Letters, digits and . _ @ + - (an e-mail address fits); never "cli:...", the command line's actor.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")


class UserError(Exception):
    """A change that cannot be made; the message says why, for the person who asked."""


@dataclass(frozen=True)
class User:
    """A user as anyone may see it: no password hash, no token digest."""

    name: str
    role: Role
    disabled: bool
    has_api_token: bool
    token_created_at: datetime | None
    password_changed_at: datetime
    created_at: datetime
    updated_at: datetime


def _user(row: Any) -> User:
    return User(
        name=row.name,
        role=Role(row.role),
        disabled=bool(row.disabled),
        has_api_token=row.token_hash is not None,
        token_created_at=row.token_created_at,
        password_changed_at=row.password_changed_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _summary(user: User) -> dict[str, Any]:
    return {"name": user.name, "role": user.role.value, "disabled": user.disabled}


def list_users(conn: Connection) -> list[User]:
    return [_user(row) for row in conn.execute(select(users).order_by(users.c.name))]


def get_user(conn: Connection, name: str) -> User | None:
    row = conn.execute(select(users).where(users.c.name == name)).one_or_none()
    return None if row is None else _user(row)


def _existing(conn: Connection, name: str) -> User:
    """The user, locked until the transaction ends: its before/after in the audit log is exact."""
    row = conn.execute(locking(conn, select(users).where(users.c.name == name))).one_or_none()
    if row is None:
        raise UserError(f"no user {name!r}")
    return _user(row)


def add_user(
    engine: Engine, name: str, role: str, password: str, *, actor: Actor, clock: Clock = utc_now
) -> User:
    if not _NAME.fullmatch(name):
        raise UserError(
            f"{name!r} is not a user name: 1 to 100 letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    try:
        Role(role)
    except ValueError:
        raise UserError(f"{role!r} is not a role: {', '.join(r.value for r in Role)}") from None
    try:
        password_hash = credentials.hash_password(password)
    except credentials.WeakPasswordError as exc:
        raise UserError(str(exc)) from exc
    now = clock()
    try:
        with engine.begin() as conn:
            conn.execute(
                users.insert().values(
                    name=name,
                    role=role,
                    password_hash=password_hash,
                    disabled=False,
                    password_changed_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
            user = _existing(conn, name)
            record(conn, actor, "user.add", name, after=_summary(user))
    except IntegrityError:  # the name's unique key: there already, or added meanwhile
        raise UserError(f"user {name!r} exists already") from None
    return user


def _set_disabled(engine: Engine, name: str, disabled: bool, actor: Actor, clock: Clock) -> bool:
    with engine.begin() as conn:
        before = _existing(conn, name)
        if before.disabled == disabled:
            return False
        conn.execute(update(users).where(users.c.name == name).values(disabled=disabled, updated_at=clock()))
        end_user_sessions(conn, name)
        action = "user.disable" if disabled else "user.enable"
        record(conn, actor, action, name, before={"disabled": before.disabled}, after={"disabled": disabled})
    return True


def disable_user(engine: Engine, name: str, *, actor: Actor, clock: Clock = utc_now) -> bool:
    """Refuse the user's password and API token from now on; False if it was disabled already."""
    return _set_disabled(engine, name, True, actor, clock)


def enable_user(engine: Engine, name: str, *, actor: Actor, clock: Clock = utc_now) -> bool:
    """Accept the user's password and API token again; False if it was enabled already."""
    return _set_disabled(engine, name, False, actor, clock)


def remove_user(engine: Engine, name: str, *, actor: Actor) -> None:
    """Delete the user and its API token; the audit log keeps what the user did."""
    with engine.begin() as conn:
        before = _existing(conn, name)
        conn.execute(delete(users).where(users.c.name == name))
        end_user_sessions(conn, name)
        record(conn, actor, "user.remove", name, before=_summary(before))


def set_password(engine: Engine, name: str, password: str, *, actor: Actor, clock: Clock = utc_now) -> None:
    try:
        password_hash = credentials.hash_password(password)
    except credentials.WeakPasswordError as exc:
        raise UserError(str(exc)) from exc
    now = clock()
    with engine.begin() as conn:
        _existing(conn, name)
        conn.execute(
            update(users)
            .where(users.c.name == name)
            .values(password_hash=password_hash, password_changed_at=now, updated_at=now)
        )
        end_user_sessions(conn, name)
        record(conn, actor, "user.passwd", name)


def issue_api_token(engine: Engine, name: str, *, actor: Actor, clock: Clock = utc_now) -> str:
    """A new API token for the user, replacing any previous one. Returned once: only its digest
    is stored, so it cannot be shown again."""
    token = credentials.new_api_token()
    now = clock()
    with engine.begin() as conn:
        before = _existing(conn, name)
        conn.execute(
            update(users)
            .where(users.c.name == name)
            .values(token_hash=credentials.token_digest(token), token_created_at=now, updated_at=now)
        )
        record(
            conn,
            actor,
            "user.token",
            name,
            before={"has_api_token": before.has_api_token},
            after={"has_api_token": True},
        )
    return token


def verify_sign_in(engine: Engine, name: str, password: str) -> User | None:
    """The user if ``password`` is theirs and they are enabled, else None.

    Takes the same time whether the user exists or not: an unknown or disabled user's attempt is
    checked against a dummy hash. A hash made with older parameters is replaced after a success.
    """
    with engine.connect() as conn:
        row = conn.execute(select(users).where(users.c.name == name)).one_or_none()
    stored = row.password_hash if row is not None and not row.disabled else None
    if not credentials.password_matches(stored, password) or row is None or stored is None:
        return None
    if credentials.needs_rehash(stored):
        with engine.begin() as conn:
            conn.execute(
                update(users)
                .where(users.c.name == name, users.c.password_hash == stored)
                .values(password_hash=credentials.HASHER.hash(password))
            )
    return _user(row)


def verify_api_token(engine: Engine, token: str) -> User | None:
    """The enabled user whose API token this is, else None."""
    digest = credentials.token_digest(token)
    with engine.connect() as conn:
        row = conn.execute(select(users).where(users.c.token_hash == digest)).one_or_none()
    if row is None or row.disabled or not credentials.digests_equal(row.token_hash, digest):
        return None
    return _user(row)
