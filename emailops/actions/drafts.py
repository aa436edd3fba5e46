"""The operator's retry and cancel of replies a language model is writing (``emailops llm`` and
the console's Drafts page)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from sqlalchemy import Connection, Engine, select

from emailops.actions.changes import Change, RowAction, State, change_each
from emailops.audit import Actor
from emailops.llm import jobs
from emailops.store.dialect import locking
from emailops.store.schema import llm_jobs
from emailops.users.permissions import Action

_ACTIONS = {
    "retry": (Action.RETRY_DRAFT, jobs.retry_job, "failed"),
    "cancel": (Action.CANCEL_DRAFT, jobs.cancel_job, "pending or failed"),
}


def change_jobs(
    engine: Engine, job_ids: Iterable[int], change: Literal["retry", "cancel"], *, account: str, actor: Actor
) -> list[Change]:
    """Retry (failed, not purged: asked again with fresh attempts) or cancel (pending or failed:
    never asked) each model job of ``account``, audited as ``drafts.retry`` / ``drafts.cancel``."""
    audit_action, apply_change, allowed = _ACTIONS[change]

    def read(conn: Connection, job_id: int) -> State | None:
        columns = llm_jobs.c
        query = select(columns.state, columns.attempts, columns.purged_at).where(
            columns.id == job_id, columns.account == account
        )
        row = conn.execute(locking(conn, query)).first()
        if row is None:
            return None
        return {"state": row.state, "attempts": row.attempts, "purged": row.purged_at is not None}

    def apply(conn: Connection, job_id: int) -> bool:
        return apply_change(conn, job_id, account=account)

    def refuse(state: State | None) -> str:
        if state is None:
            return f"no such model job of {account}"
        if change == "retry" and state["purged"]:
            return "its prompt was purged (REPLY_HISTORY_DAYS); there is nothing to ask"
        return f"it is {state['state']}; {change} applies to {allowed} jobs"

    action = RowAction(audit_action.value, "llm_job", read, apply, refuse, account)
    return change_each(engine, action, job_ids, actor)
