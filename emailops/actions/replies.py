"""The operator's resolutions of automatic replies: confirm an unknown one as sent, send again, or
cancel (``emailops outbox`` and the console's Outbox page)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Connection, Engine, select

from emailops.actions.changes import Change, RowAction, State, change_each
from emailops.audit import Actor
from emailops.replies import outbox
from emailops.store.dialect import locking
from emailops.store.schema import outbox as outbox_table
from emailops.users.permissions import Action


class Resolution(StrEnum):
    SENT = "sent"  # it was delivered: never send it
    RESEND = "resend"  # failed, or unknown and not delivered: send again
    CANCEL = "cancel"  # never send it


_ALLOWED = {
    Resolution.SENT: outbox.CONFIRMABLE,
    Resolution.RESEND: outbox.RETRYABLE,
    Resolution.CANCEL: outbox.CANCELLABLE,
}
_CHANGE = {
    Resolution.SENT: outbox.confirm_sent,
    Resolution.RESEND: outbox.retry_reply,
    Resolution.CANCEL: outbox.cancel_reply,
}


def resolve_replies(
    engine: Engine,
    reply_ids: Iterable[int],
    resolution: Resolution,
    *,
    account: str,
    actor: Actor,
    now: datetime,
) -> list[Change]:
    """Resolve each reply of ``account`` as ``resolution``, audited as ``outbox.resolve``; a reply
    in a state the resolution does not apply to is left as it is (its Change says why)."""

    def read(conn: Connection, reply_id: int) -> State | None:
        columns = outbox_table.c
        query = select(columns.state, columns.attempts, columns.purged_at).where(
            columns.id == reply_id, columns.account == account
        )
        row = conn.execute(locking(conn, query)).first()
        if row is None:
            return None
        return {"state": row.state, "attempts": row.attempts, "purged": row.purged_at is not None}

    def apply(conn: Connection, reply_id: int) -> bool:
        return _CHANGE[resolution](conn, reply_id, now=now, account=account)

    def refuse(state: State | None) -> str:
        if state is None:
            return f"no such reply of {account}"
        if resolution is Resolution.RESEND and state["purged"]:
            return "its text was purged (REPLY_HISTORY_DAYS); there is nothing to send"
        *others, last = _ALLOWED[resolution]
        allowed = f"{', '.join(others)} or {last}" if others else last
        return f"it is {state['state']}; {resolution} applies to {allowed} replies"

    action = RowAction(
        Action.RESOLVE_OUTBOX.value, "outbox", read, apply, refuse, account, noted={"as": resolution.value}
    )
    return change_each(engine, action, reply_ids, actor)
