"""The user record of someone who signs in through the identity provider (kind "oidc").

Made at the first sign-in and given, at every sign-in, the role the provider's groups map to now.
Such a user has no password: its ``password_hash`` is ``OIDC_PASSWORD_HASH``, which is no Argon2
hash, so a password sign-in as that user always fails. A password user of the same name is never
taken over. Each creation and each change of role is recorded in the audit log.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError

from emailops.audit import Actor, record
from emailops.clock import Clock, utc_now
from emailops.store.dialect import locking
from emailops.store.schema import users
from emailops.users.accounts import _NAME, User, UserError, get_user
from emailops.users.permissions import Role

# Marks a user of the identity provider; never an Argon2 hash ("$argon2id$...").
OIDC_PASSWORD_HASH = "!oidc"  # noqa: S105 (a marker, not a secret)


def is_oidc_user(password_hash: str) -> bool:
    return password_hash == OIDC_PASSWORD_HASH


def sign_in_oidc_user(
    engine: Engine, name: str, role: Role, *, source: str | None, clock: Clock = utc_now
) -> User:
    """The enabled OIDC user ``name``, made or given ``role``; ``UserError`` when it may not sign in."""
    if not _NAME.fullmatch(name):
        raise UserError(f"{name[:100]!r} from the identity provider is not a user name")
    actor = Actor(name=name, role=role.value, source=source)
    try:
        return _sign_in(engine, name, role, actor, clock())
    except IntegrityError:  # made meanwhile by a sign-in of the same user
        return _sign_in(engine, name, role, actor, clock())


def _sign_in(engine: Engine, name: str, role: Role, actor: Actor, now: datetime) -> User:
    with engine.begin() as conn:
        row = conn.execute(locking(conn, select(users).where(users.c.name == name))).one_or_none()
        if row is None:
            conn.execute(
                users.insert().values(
                    name=name,
                    role=role.value,
                    password_hash=OIDC_PASSWORD_HASH,
                    disabled=False,
                    password_changed_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
            record(
                conn, actor, "user.add", name, after={"role": role.value, "disabled": False, "kind": "oidc"}
            )
        elif not is_oidc_user(row.password_hash):
            raise UserError(f"user {name!r} signs in with a password, not through the identity provider")
        elif row.disabled:
            raise UserError(f"user {name!r} is disabled")
        elif row.role != role.value:
            conn.execute(update(users).where(users.c.name == name).values(role=role.value, updated_at=now))
            record(conn, actor, "user.role", name, before={"role": row.role}, after={"role": role.value})
        user = get_user(conn, name)
    assert user is not None
    return user
