"""Quarantine (operator): messages set aside because indexing or their rules kept failing; each
handed back to its stage (retry) or, set aside by the rules, marked done unanswered (release),
by ``emailops.actions.quarantine``. The page shows the chosen account's messages, or every
account's with an Account column; an action acts on the account its form names (the row's own)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response

from emailops.actions.changes import Change
from emailops.actions.quarantine import Stage, find_quarantined, release_quarantined, retry_quarantined
from emailops.store import index_work, rules_work
from emailops.store.database import reading
from emailops.store.quarantine import QuarantinedMessage
from emailops.users.permissions import Action
from prod.console.calls import Call, ConsoleRoute
from prod.console.mailbox import AccountChoice, acting_choice, page_choice
from prod.console.pages.actor import actor_of
from prod.console.pages.raw_mail import fetch_raw


def _entries(call: Call, choice: AccountChoice) -> list[dict[str, object]]:
    found: list[tuple[str, Stage, QuarantinedMessage]] = []
    with reading(call.context.engine) as conn:
        for account in choice.keys:
            found += [(account, Stage.INDEX, e) for e in index_work.list_quarantined(conn, account)]
            found += [(account, Stage.RULES, e) for e in rules_work.list_quarantined(conn, account)]
    return [_entry(call, choice, account, stage, entry) for account, stage, entry in found]


def _entry(
    call: Call, choice: AccountChoice, account: str, stage: Stage, entry: QuarantinedMessage
) -> dict[str, object]:
    key = f"{stage}-{entry.row_id}"
    return {
        "id": key,
        "url": call.url(f"/quarantine?{choice.query()}#{key}"),
        "account": choice.name_of(account),
        "stage": stage.value,
        "row_id": entry.row_id,
        "folder": entry.folder,
        "uid": entry.uid,
        "message_id": entry.message_id,
        "attempts": entry.attempts,
        "reason": entry.reason,
    }


def quarantine_page(call: Call, status_code: int = 200, notice: str | None = None) -> Response:
    choice = page_choice(call, every_offered=True)
    if isinstance(choice, Response):
        return choice
    return call.render(
        "quarantine.html",
        status_code,
        choice=choice,
        entries=_entries(call, choice),
        notice=notice,
        error=notice if status_code >= 400 else None,
    )


def quarantine_api(call: Call) -> Response:
    choice = page_choice(call, every_offered=True)
    if isinstance(choice, Response):
        return choice
    url = call.url(f"/quarantine?{choice.query()}")
    return call.json({"id": "quarantine", "url": url, "messages": _entries(call, choice)})


def raw_download(call: Call) -> Response:
    """The quarantined message of the account ``account=`` names (as the server holds it: an .eml
    download), fetched from IMAP."""
    row_id = int(call.request.path_params["id"])
    try:
        stage = Stage(call.request.path_params["stage"])
    except ValueError:
        return Response("the stage is index or rules", 404, media_type="text/plain")
    choice = page_choice(call)
    if isinstance(choice, Response):
        return choice
    with reading(call.context.engine) as conn:
        entry = find_quarantined(conn, stage, row_id, choice.key)
    if entry is None:
        return Response(
            f"no quarantined message {stage}-{row_id} of {choice.value}", 404, media_type="text/plain"
        )
    raw = fetch_raw(call, choice.account, entry.folder, entry.uidvalidity, entry.uid)
    if isinstance(raw, Response):
        return raw
    disposition = f'attachment; filename="quarantined-{stage}-{row_id}.eml"'
    return Response(raw, media_type="message/rfc822", headers={"Content-Disposition": disposition})


# What an action did: (the message's key, what to tell, the status), or the 404 answer to give.
Outcome = tuple[str, str, int] | Response


def _act(call: Call, verb: str, act: Callable[[Stage, int, str], Change]) -> Outcome:
    """``act`` on the message of the path, of the account the form (or JSON body) names."""
    row_id = int(call.request.path_params["id"])
    try:
        stage = Stage(call.request.path_params["stage"])
    except ValueError:
        return f"{row_id}", "the stage is index or rules", 404
    acting = acting_choice(call)
    if isinstance(acting, Response):
        return acting
    change = act(stage, row_id, acting.key)
    key = f"{stage}-{row_id}"
    if not change.done:
        return key, f"Message {key} not changed: {change.refusal}.", 409 if change.before else 404
    return key, f"Message {key} of {acting.value}: {verb}.", 200


def _retry(call: Call) -> Outcome:
    def act(stage: Stage, row_id: int, account: str) -> Change:
        (change,) = retry_quarantined(
            call.context.engine, stage, [row_id], account=account, actor=actor_of(call)
        )
        return change

    return _act(call, "handed back to its stage", act)


def _release(call: Call) -> Outcome:
    def act(stage: Stage, row_id: int, account: str) -> Change:
        if stage is not Stage.RULES:
            return Change(row_id, False, None, None, "only a message set aside by its rules is released")
        (change,) = release_quarantined(call.context.engine, [row_id], account=account, actor=actor_of(call))
        return change

    return _act(call, "released (done, not answered)", act)


def _form(action: Callable[[Call], Outcome]) -> Callable[[Call], Response]:
    def handler(call: Call) -> Response:
        outcome = action(call)
        if isinstance(outcome, Response):
            return outcome
        _, notice, status = outcome
        return quarantine_page(call, status, notice)

    return handler


def _api(action: Callable[[Call], Outcome]) -> Callable[[Call], Response]:
    def handler(call: Call) -> Response:
        outcome = action(call)
        if isinstance(outcome, Response):
            return outcome
        key, notice, status = outcome
        answer = "done" if status == 200 else "error"
        return call.json({"id": key, "url": call.url(f"/quarantine#{key}"), answer: notice}, status)

    return handler


_ONE = "/quarantine/{stage}/{id:int}"
ROUTES = [
    ConsoleRoute("/quarantine", quarantine_page, Action.VIEW_QUARANTINE, nav="Quarantine"),
    ConsoleRoute("/api/v1/quarantine", quarantine_api, Action.VIEW_QUARANTINE),
    ConsoleRoute(f"{_ONE}/raw", raw_download, Action.VIEW_QUARANTINE),
    ConsoleRoute(f"{_ONE}/retry", _form(_retry), Action.RETRY_QUARANTINE, methods=("POST",)),
    ConsoleRoute(f"/api/v1{_ONE}/retry", _api(_retry), Action.RETRY_QUARANTINE, methods=("POST",)),
    ConsoleRoute(f"{_ONE}/release", _form(_release), Action.RELEASE_QUARANTINE, methods=("POST",)),
    ConsoleRoute(f"/api/v1{_ONE}/release", _api(_release), Action.RELEASE_QUARANTINE, methods=("POST",)),
]
