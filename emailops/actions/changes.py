"""The shape every operator action shares: rows changed one at a time, each with its audit entry.

Each row is read locked, changed and read again in its own transaction with its ``audit.record``,
so a change is never without its entry and one refused row does not hold back the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from emailops import audit
from emailops.audit import Actor

# A row's state as the audit entry and the caller see it (None: no such row of the account).
State = Mapping[str, Any]


@dataclass(frozen=True)
class Change:
    """What an action did to one row: ``done``, or ``refusal`` says why not; states before and after."""

    row_id: int
    done: bool
    before: State | None
    after: State | None
    refusal: str | None = None


@dataclass(frozen=True)
class RowAction:
    """An action on the rows of one table: ``read`` the row's state (locked), ``apply`` the change
    (False when the row is not in a state it applies to), ``refuse`` says why a row was not changed
    (given its state, None when there is no such row). ``account``: the key of the account whose
    rows it changes, named by the audit entry's target (``ACCOUNT/TARGET:ID``, as fetch now's
    ``ACCOUNT/FOLDER``). ``noted`` goes into the audit entry's ``after`` too (what was asked, where
    the state alone does not say)."""

    name: str
    target: str
    read: Callable[[Connection, int], State | None]
    apply: Callable[[Connection, int], bool]
    refuse: Callable[[State | None], str]
    account: str
    noted: State = field(default_factory=dict)


def change_each(engine: Engine, action: RowAction, row_ids: Iterable[int], actor: Actor) -> list[Change]:
    """Apply ``action`` to each row in its own transaction with its audit entry; one Change per id."""
    changes = []
    for row_id in row_ids:
        with engine.begin() as conn:
            before = action.read(conn, row_id)
            if before is None or not action.apply(conn, row_id):
                changes.append(Change(row_id, False, before, before, action.refuse(before)))
                continue
            after = action.read(conn, row_id)
            target = f"{action.account}/{action.target}:{row_id}"
            audit.record(
                conn, actor, action.name, target, before=before, after={**(after or {}), **action.noted}
            )
            changes.append(Change(row_id, True, before, after))
    return changes
