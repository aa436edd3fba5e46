"""The outbox (operator): automatic replies newest first; an unknown one resolved as sent, sent
again or cancelled (``emailops.actions.replies``, which ``emailops outbox`` calls too). The page
shows the chosen account's replies, or every account's with an Account column; a resolution acts
on the account its form names (the row's own), whatever the page shows."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.responses import Response

from emailops.actions.replies import Resolution, resolve_replies
from emailops.replies import outbox
from emailops.replies.outbox import OutboxRow, OutboxState
from emailops.store.database import reading
from emailops.users.permissions import Action
from prod.console.calls import Call, ConsoleRoute
from prod.console.mailbox import AccountChoice, acting_choice, page_choice
from prod.console.pages.actor import actor_of

PAGE_SIZE = 200
# The resolutions offered for a reply in each state.
OFFERED = {
    OutboxState.UNKNOWN: (Resolution.SENT, Resolution.RESEND, Resolution.CANCEL),
    OutboxState.FAILED: (Resolution.RESEND, Resolution.CANCEL),
    OutboxState.PENDING: (Resolution.CANCEL,),
}


def _replies(call: Call, choice: AccountChoice) -> list[dict[str, object]]:
    wanted = call.request.query_params.get("state")
    states = (wanted,) if wanted in {s.value for s in OutboxState} else None
    with reading(call.context.engine) as conn:
        # Every account's: all rows (an account removed takes its rows with it).
        account = None if choice.every else choice.key
        found = outbox.list_replies(conn, states=states, account=account, limit=PAGE_SIZE)
    return [_reply(call, choice, row) for row in found]


def _reply(call: Call, choice: AccountChoice, row: OutboxRow) -> dict[str, object]:
    return {
        "id": row.id,
        "url": call.url(f"/outbox?{choice.query()}#reply-{row.id}"),
        "account": choice.name_of(row.account),
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
    choice = page_choice(call, every_offered=True)
    if isinstance(choice, Response):
        return choice
    return call.render(
        "outbox.html",
        status_code,
        choice=choice,
        replies=_replies(call, choice),
        state=call.request.query_params.get("state", ""),
        states=[s.value for s in OutboxState],
        notice=notice,
        error=notice if status_code >= 400 else None,
    )


def outbox_api(call: Call) -> Response:
    choice = page_choice(call, every_offered=True)
    if isinstance(choice, Response):
        return choice
    return call.json(
        {"id": "outbox", "url": call.url(f"/outbox?{choice.query()}"), "replies": _replies(call, choice)}
    )


def _resolve(call: Call) -> tuple[int, str, int] | Response:
    """Resolve the reply of the path, of the account the form (or JSON body) names, as its
    ``as``: (id, what, status), or the 404 answer for an unknown account."""
    reply_id = int(call.request.path_params["id"])
    acting = acting_choice(call)
    if isinstance(acting, Response):
        return acting
    try:
        resolution = Resolution(call.form.get("as", ""))
    except ValueError:
        return reply_id, 'give "as": sent, resend or cancel', 400
    (change,) = resolve_replies(
        call.context.engine,
        [reply_id],
        resolution,
        account=acting.key,
        actor=actor_of(call),
        now=datetime.now(UTC),
    )
    if not change.done:
        return reply_id, f"Reply {reply_id} not changed: {change.refusal}.", 409 if change.before else 404
    return (
        reply_id,
        f"Reply {reply_id} of {acting.value} resolved as {resolution}: "
        f"now {change.after and change.after['state']}.",
        200,
    )


def resolve_form(call: Call) -> Response:
    resolved = _resolve(call)
    if isinstance(resolved, Response):
        return resolved
    _, notice, status = resolved
    return outbox_page(call, status, notice)


def resolve_api(call: Call) -> Response:
    resolved = _resolve(call)
    if isinstance(resolved, Response):
        return resolved
    reply_id, notice, status = resolved
    key = "done" if status == 200 else "error"
    return call.json({"id": reply_id, "url": call.url(f"/outbox#reply-{reply_id}"), key: notice}, status)


ROUTES = [
    ConsoleRoute("/outbox", outbox_page, Action.VIEW_OUTBOX, nav="Outbox"),
    ConsoleRoute("/api/v1/outbox", outbox_api, Action.VIEW_OUTBOX),
    ConsoleRoute("/outbox/{id:int}/resolve", resolve_form, Action.RESOLVE_OUTBOX, methods=("POST",)),
    ConsoleRoute("/api/v1/outbox/{id:int}/resolve", resolve_api, Action.RESOLVE_OUTBOX, methods=("POST",)),
]
