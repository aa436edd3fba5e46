"""The outbox (operator): automatic replies newest first; an unknown one resolved as sent, sent
again or cancelled (``emailops.actions.replies``, which ``emailops outbox`` calls too)."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.responses import Response

from emailops.actions.replies import Resolution, resolve_replies
from emailops.replies import outbox
from emailops.replies.outbox import OutboxRow, OutboxState
from emailops.store.database import reading
from emailops.users.permissions import Action
from prod.console.calls import Call, ConsoleRoute
from prod.console.mailbox import shown_account_key
from prod.console.pages.actor import actor_of

PAGE_SIZE = 200
# The resolutions offered for a reply in each state.
OFFERED = {
    OutboxState.UNKNOWN: (Resolution.SENT, Resolution.RESEND, Resolution.CANCEL),
    OutboxState.FAILED: (Resolution.RESEND, Resolution.CANCEL),
    OutboxState.PENDING: (Resolution.CANCEL,),
}


def _replies(call: Call) -> list[dict[str, object]]:
    wanted = call.request.query_params.get("state")
    states = (wanted,) if wanted in {s.value for s in OutboxState} else None
    with reading(call.context.engine) as conn:
        found = outbox.list_replies(conn, states=states, account=shown_account_key(call), limit=PAGE_SIZE)
    return [_reply(call, row) for row in found]


def _reply(call: Call, row: OutboxRow) -> dict[str, object]:
    return {
        "id": row.id,
        "url": call.url(f"/outbox#reply-{row.id}"),
        "state": row.state,
        "rule": row.rule_name,
        "action": row.action,
        "recipient": row.recipient,
        "subject": row.subject,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "created_at": row.created_at,
        "sent_at": row.sent_at,
        "resolutions": [r.value for r in OFFERED.get(row.state, ())],
    }


def outbox_page(call: Call, status_code: int = 200, notice: str | None = None) -> Response:
    return call.render(
        "outbox.html",
        status_code,
        replies=_replies(call),
        state=call.request.query_params.get("state", ""),
        states=[s.value for s in OutboxState],
        notice=notice,
        error=notice if status_code >= 400 else None,
    )


def outbox_api(call: Call) -> Response:
    return call.json({"id": "outbox", "url": call.url("/outbox"), "replies": _replies(call)})


def _resolve(call: Call) -> tuple[int, str, int]:
    """Resolve the reply of the path as the form's (or JSON body's) ``as``: (id, what, status)."""
    reply_id = int(call.request.path_params["id"])
    try:
        resolution = Resolution(call.form.get("as", ""))
    except ValueError:
        return reply_id, 'give "as": sent, resend or cancel', 400
    (change,) = resolve_replies(
        call.context.engine,
        [reply_id],
        resolution,
        account=shown_account_key(call),
        actor=actor_of(call),
        now=datetime.now(UTC),
    )
    if not change.done:
        return reply_id, f"Reply {reply_id} not changed: {change.refusal}.", 409 if change.before else 404
    return (
        reply_id,
        f"Reply {reply_id} resolved as {resolution}: now {change.after and change.after['state']}.",
        200,
    )


def resolve_form(call: Call) -> Response:
    _, notice, status = _resolve(call)
    return outbox_page(call, status, notice)


def resolve_api(call: Call) -> Response:
    reply_id, notice, status = _resolve(call)
    key = "done" if status == 200 else "error"
    return call.json({"id": reply_id, "url": call.url(f"/outbox#reply-{reply_id}"), key: notice}, status)


ROUTES = [
    ConsoleRoute("/outbox", outbox_page, Action.VIEW_OUTBOX, nav="Outbox"),
    ConsoleRoute("/api/v1/outbox", outbox_api, Action.VIEW_OUTBOX),
    ConsoleRoute("/outbox/{id:int}/resolve", resolve_form, Action.RESOLVE_OUTBOX, methods=("POST",)),
    ConsoleRoute("/api/v1/outbox/{id:int}/resolve", resolve_api, Action.RESOLVE_OUTBOX, methods=("POST",)),
]
