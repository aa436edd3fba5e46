"""The operator's retry and release of quarantined messages (the console's Quarantine page).

A message is quarantined by the stage that kept failing on it: ``index`` (never indexed; the row
of ``index_quarantine``) or ``rules`` (indexed, never answered; the row of ``messages``).
Retry hands it back to its stage with fresh attempts; release (rules stage) marks it done without
its rules running, for a message the operator deals with by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum

from sqlalchemy import Connection, Engine, select

from emailops.actions.changes import Change, RowAction, State, change_each
from emailops.audit import Actor
from emailops.store import index_work, rules_work
from emailops.store.dialect import locking
from emailops.store.quarantine import QuarantinedMessage
from emailops.store.schema import folders, index_quarantine, messages
from emailops.users.permissions import Action


class Stage(StrEnum):
    INDEX = "index"
    RULES = "rules"


def _index_state(account: str) -> Callable[[Connection, int], State | None]:
    def read(conn: Connection, row_id: int) -> State | None:
        query = (
            select(index_quarantine.c.uid, index_quarantine.c.attempts, folders.c.name)
            .join_from(index_quarantine, folders, folders.c.id == index_quarantine.c.folder_id)
            .where(index_quarantine.c.id == row_id, folders.c.account == account)
        )
        row = conn.execute(locking(conn, query)).first()
        if row is None:
            return None
        return {"state": "quarantined", "folder": row.name, "uid": row.uid, "attempts": row.attempts}

    return read


def rules_state_reader(account: str) -> Callable[[Connection, int], State | None]:
    def read(conn: Connection, pk: int) -> State | None:
        query = (
            select(messages.c.rules_state, messages.c.rules_attempts, messages.c.uid, folders.c.name)
            .join_from(messages, folders, folders.c.id == messages.c.folder_id)
            .where(messages.c.id == pk, folders.c.account == account)
        )
        row = conn.execute(locking(conn, query)).first()
        if row is None:
            return None
        return {"state": row.rules_state, "folder": row.name, "uid": row.uid, "attempts": row.rules_attempts}

    return read


def retry_quarantined(
    engine: Engine, stage: Stage, row_ids: Iterable[int], *, account: str, actor: Actor
) -> list[Change]:
    """Hand each quarantined message of ``account`` back to ``stage`` with fresh attempts, audited
    as ``quarantine.retry`` (index: the next pass fetches it again; rules: pending again)."""
    refuse: Callable[[State | None], str]
    if stage is Stage.INDEX:
        read = _index_state(account)

        def apply(conn: Connection, row_id: int) -> bool:
            return index_work.retry_quarantined(conn, row_id, account)

        def refuse_index(state: State | None) -> str:
            if state is None:
                return f"no message of {account} quarantined by indexing with this id"
            return "it is of a former UIDVALIDITY of its folder; the next pass sets it aside again"

        refuse = refuse_index

    else:
        read = rules_state_reader(account)

        def apply(conn: Connection, row_id: int) -> bool:
            return rules_work.retry_quarantined(conn, row_id, account)

        refuse = _refuse_rules(account)
    action = RowAction(Action.RETRY_QUARANTINE.value, f"quarantine.{stage}", read, apply, refuse, account)
    return change_each(engine, action, row_ids, actor)


def release_quarantined(
    engine: Engine, row_ids: Iterable[int], *, account: str, actor: Actor
) -> list[Change]:
    """Mark each message of ``account`` the rules stage quarantined as done without its rules
    running (it is never answered automatically), audited as ``quarantine.release``."""

    def apply(conn: Connection, pk: int) -> bool:
        return rules_work.release_quarantined(conn, pk, account)

    action = RowAction(
        Action.RELEASE_QUARANTINE.value,
        "quarantine.rules",
        rules_state_reader(account),
        apply,
        _refuse_rules(account),
        account,
    )
    return change_each(engine, action, row_ids, actor)


def _refuse_rules(account: str) -> Callable[[State | None], str]:
    def refuse(state: State | None) -> str:
        if state is None:
            return f"no indexed message of {account} with this id"
        return f"its rules are {state['state']}, not quarantined"

    return refuse


def find_quarantined(conn: Connection, stage: Stage, row_id: int, account: str) -> QuarantinedMessage | None:
    """Quarantined message ``row_id`` of ``stage`` and ``account`` (where to download it from), or None."""
    listing = index_work.list_quarantined if stage is Stage.INDEX else rules_work.list_quarantined
    return next((entry for entry in listing(conn, account) if entry.row_id == row_id), None)
