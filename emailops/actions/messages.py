"""The operator's actions on one message or folder: run its rules again, fetch a folder now."""

from __future__ import annotations

from sqlalchemy import Connection, Engine

from emailops import audit
from emailops.actions.changes import Change, RowAction, State, change_each
from emailops.actions.quarantine import rules_state_reader
from emailops.audit import Actor
from emailops.store import folders as folder_store
from emailops.store import rules_work
from emailops.users.permissions import Action


def rerun_rules(engine: Engine, message_pk: int, *, account: str, actor: Actor) -> Change:
    """Run the rules of an indexed message of ``account`` again (done or quarantined: pending
    with fresh attempts), audited as ``messages.rerun_rules``. A rule that recorded a reply before
    finds it recorded (the outbox's key on message and rule): it never replies twice."""

    def apply(conn: Connection, pk: int) -> bool:
        return rules_work.rerun(conn, pk, account)

    def refuse(state: State | None) -> str:
        if state is None:
            return f"no indexed message of {account} with this id"
        if state["state"] == "history":
            return "it was there before the first sync: its rules never run (no reply to old mail)"
        return f"its rules are {state['state']}; they run again once done or quarantined"

    action = RowAction(
        Action.RERUN_RULES.value, "message", rules_state_reader(account), apply, refuse, account
    )
    (change,) = change_each(engine, action, [message_pk], actor)
    return change


def request_fetch(engine: Engine, folder: str, *, account: str, actor: Actor) -> bool:
    """Ask the worker watching ``folder`` of ``account`` to sync it now (within a few seconds),
    audited as ``accounts.fetch_now``; False when the folder is not in the index."""
    with engine.begin() as conn:
        if not folder_store.request_fetch(conn, account, folder):
            return False
        audit.record(conn, actor, Action.FETCH_NOW.value, f"{account}/{folder}")
    return True
