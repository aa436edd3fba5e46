"""Drafts (viewer reads, operator acts): the replies a language model is writing (``llm_jobs``),
newest first; a failed one retried, a pending or failed one cancelled, by
``emailops.actions.drafts.change_jobs`` (which ``emailops llm`` calls too). The page shows the
chosen account's jobs, or every account's with an Account column; a change acts on the account
its form names (the row's own)."""

from __future__ import annotations

from typing import Literal

from starlette.responses import Response

from emailops.actions.drafts import change_jobs
from emailops.llm import jobs
from emailops.llm.jobs import JobState, LlmJob
from emailops.store.database import reading
from emailops.users.permissions import Action
from prod.console.calls import Call, ConsoleRoute
from prod.console.mailbox import AccountChoice, acting_choice, page_choice
from prod.console.pages.actor import actor_of

PAGE_SIZE = 200
# The changes offered for a job in each state.
OFFERED: dict[JobState, tuple[Literal["retry", "cancel"], ...]] = {
    JobState.FAILED: ("retry", "cancel"),
    JobState.PENDING: ("cancel",),
}


def _drafts(call: Call, choice: AccountChoice) -> list[dict[str, object]]:
    wanted = call.request.query_params.get("state")
    states = (wanted,) if wanted in {s.value for s in JobState} else None
    with reading(call.context.engine) as conn:
        found = [
            job
            for account in choice.keys
            for job in jobs.list_jobs(conn, account=account, states=states, limit=PAGE_SIZE)
        ]
    # Every account's: the newest PAGE_SIZE of them all.
    newest = sorted(found, key=lambda job: job.id, reverse=True)[:PAGE_SIZE]
    return [_draft(call, choice, job) for job in newest]


def _draft(call: Call, choice: AccountChoice, job: LlmJob) -> dict[str, object]:
    return {
        "id": job.id,
        "url": call.url(f"/drafts?{choice.query()}#job-{job.id}"),
        "account": choice.name_of(job.account),
        "state": job.state,
        "rule": job.rule_name,
        "model": job.model,
        "recipient": job.recipient,
        "subject": job.subject,
        "attempts": job.attempts,
        "reason": job.last_error,
        "outbox_id": job.outbox_id,
        "created_at": job.created_at,
        "changes": list(OFFERED.get(job.state, ())),
    }


def drafts_page(call: Call, status_code: int = 200, notice: str | None = None) -> Response:
    choice = page_choice(call, every_offered=True)
    if isinstance(choice, Response):
        return choice
    return call.render(
        "drafts.html",
        status_code,
        choice=choice,
        drafts=_drafts(call, choice),
        state=call.request.query_params.get("state", ""),
        states=[s.value for s in JobState],
        notice=notice,
        error=notice if status_code >= 400 else None,
    )


def drafts_api(call: Call) -> Response:
    choice = page_choice(call, every_offered=True)
    if isinstance(choice, Response):
        return choice
    url = call.url(f"/drafts?{choice.query()}")
    return call.json({"id": "drafts", "url": url, "drafts": _drafts(call, choice)})


def _change(call: Call, change: Literal["retry", "cancel"]) -> tuple[int, str, int] | Response:
    """``change`` the job of the path, of the account the form (or JSON body) names: (id, what,
    status), or the 404 answer for an unknown account."""
    job_id = int(call.request.path_params["id"])
    acting = acting_choice(call)
    if isinstance(acting, Response):
        return acting
    (done,) = change_jobs(call.context.engine, [job_id], change, account=acting.key, actor=actor_of(call))
    if not done.done:
        return job_id, f"Model job {job_id} not changed: {done.refusal}.", 409 if done.before else 404
    after = done.after and done.after["state"]
    return job_id, f"Model job {job_id} of {acting.value}: {change} done, now {after}.", 200


def _form(change: Literal["retry", "cancel"]) -> ConsoleRoute:
    def handler(call: Call) -> Response:
        changed = _change(call, change)
        if isinstance(changed, Response):
            return changed
        _, notice, status = changed
        return drafts_page(call, status, notice)

    action = Action.RETRY_DRAFT if change == "retry" else Action.CANCEL_DRAFT
    return ConsoleRoute(f"/drafts/{{id:int}}/{change}", handler, action, methods=("POST",))


def _api(change: Literal["retry", "cancel"]) -> ConsoleRoute:
    def handler(call: Call) -> Response:
        changed = _change(call, change)
        if isinstance(changed, Response):
            return changed
        job_id, notice, status = changed
        key = "done" if status == 200 else "error"
        return call.json({"id": job_id, "url": call.url(f"/drafts#job-{job_id}"), key: notice}, status)

    action = Action.RETRY_DRAFT if change == "retry" else Action.CANCEL_DRAFT
    return ConsoleRoute(f"/api/v1/drafts/{{id:int}}/{change}", handler, action, methods=("POST",))


ROUTES = [
    ConsoleRoute("/drafts", drafts_page, Action.VIEW_DRAFTS, nav="Drafts"),
    ConsoleRoute("/api/v1/drafts", drafts_api, Action.VIEW_DRAFTS),
    _form("retry"),
    _api("retry"),
    _form("cancel"),
    _api("cancel"),
]
