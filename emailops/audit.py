"""The audit log: who changed what, when, from where. Append-only.

Every change made through the command line or the console is written by ``record``: one row in
``audit_log`` and one JSON log line with ``"component":"audit"``. This module offers no way to
change or delete a row, and the database refuses both (triggers, migration 17). ``before`` and
``after`` describe the change in JSON and never carry a secret: ``record`` refuses keys that name
one. Within a caller's transaction the line is written when the row is inserted, so a rollback can
leave a line without its row, never a row without its line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, select

from emailops.store.db_clock import db_now
from emailops.store.schema import audit_log

log = structlog.get_logger(component="audit")

# Keys that never belong in before/after: the value would be a secret or what stands for one.
SECRET_KEYS = frozenset({"password", "password_hash", "token", "token_hash", "secret", "api_key"})


@dataclass(frozen=True)
class Actor:
    """Who acts: a user's name (or ``cli:<OS user>``), the role they act with, and their address
    (None on the command line)."""

    name: str
    role: str
    source: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    role: str
    source: str | None
    action: str
    target: str | None
    before: Any
    after: Any


@dataclass(frozen=True)
class Change:
    """One change for ``record_many``: what ``record`` takes after the actor."""

    action: str
    target: str | None = None
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None


class SecretInAuditError(ValueError):
    """before/after named a secret; nothing was recorded."""


def _check_no_secret(change: Mapping[str, Any] | None) -> None:
    named = sorted(SECRET_KEYS & set(change or ()))
    if named:
        raise SecretInAuditError(f"an audit record never carries a secret: {', '.join(named)}")


def _json(change: Mapping[str, Any] | None) -> str | None:
    return None if change is None else json.dumps(change, sort_keys=True, ensure_ascii=False, default=str)


def record(
    conn_or_engine: Connection | Engine,
    actor: Actor,
    action: str,
    target: str | None = None,
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry, timed by the database's clock. With a ``Connection`` it is part of the
    caller's transaction (record a change in the transaction that makes it); with an ``Engine``
    it is committed at once."""
    _check_no_secret(before)
    _check_no_secret(after)
    if isinstance(conn_or_engine, Engine):
        with conn_or_engine.begin() as conn:
            return record(conn, actor, action, target, before=before, after=after)
    conn = conn_or_engine
    row = conn.execute(
        audit_log.insert()
        .values(
            at=db_now(conn),
            actor=actor.name,
            role=actor.role,
            source=actor.source,
            action=action,
            target=target,
            before_json=_json(before),
            after_json=_json(after),
        )
        .returning(audit_log)
    ).one()
    entry = _entry(row)
    _log(actor, Change(action, target, entry.before, entry.after), audit_id=entry.id)
    return entry


def _log(actor: Actor, change: Change, *, audit_id: int | None = None) -> None:
    log.info(
        "audit",
        audit_id=audit_id,
        actor=actor.name,
        role=actor.role,
        source=actor.source,
        action=change.action,
        target=change.target,
        before=change.before,
        after=change.after,
    )


def record_many(conn: Connection, actor: Actor, changes: Sequence[Change]) -> None:
    """``record`` for many changes of one action in the caller's transaction, in one statement
    (an import of a thousand accounts: one row each, without a round trip each)."""
    for change in changes:
        _check_no_secret(change.before)
        _check_no_secret(change.after)
    if not changes:
        return
    conn.execute(
        audit_log.insert().values(at=db_now(conn)),
        [
            {
                "actor": actor.name,
                "role": actor.role,
                "source": actor.source,
                "action": change.action,
                "target": change.target,
                "before_json": _json(change.before),
                "after_json": _json(change.after),
            }
            for change in changes
        ],
    )
    for change in changes:
        _log(actor, change)


def list_entries(
    conn: Connection,
    *,
    since: datetime | None = None,
    actions: Iterable[str] = (),
    actor: str | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """The newest entries first, at most ``limit``, filtered by time, action and actor."""
    query = select(audit_log).order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(audit_log.c.at >= since)
    wanted = list(actions)
    if wanted:
        query = query.where(audit_log.c.action.in_(wanted))
    if actor is not None:
        query = query.where(audit_log.c.actor == actor)
    return [_entry(row) for row in conn.execute(query)]


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor=row.actor,
        role=row.role,
        source=row.source,
        action=row.action,
        target=row.target,
        before=None if row.before_json is None else json.loads(row.before_json),
        after=None if row.after_json is None else json.loads(row.after_json),
    )
