"""The landing page (viewer and up): every account of the deployment with its state, last sync
and last error; per folder of each its state, last sync, last error and watch mode, with "Fetch
now" (operator, ``emailops.actions.messages.request_fetch``, on the folder's own account); what waits
for the operator; the last 24 hours as an inline SVG chart. ``/events`` sends the page's live part
again whenever it changes (server-sent events, read by ``static/overview-live.js``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

from starlette.responses import Response, StreamingResponse

from emailops.accounts.config import AccountConfig
from emailops.accounts.status import AccountStatus, account_statuses
from emailops.actions.messages import request_fetch
from emailops.overview import HOURS, Overview, overview
from emailops.store.database import reading
from emailops.users.permissions import Action
from emailops.users.sessions import session_alive
from prod.console.calls import Call, ConsoleRoute
from prod.console.mailbox import ALL, acting_choice, deployment_accounts_of
from prod.console.pages.actor import actor_of
from prod.console.watching import watched_folders

# The live part is read again this often, per open page (a handful of counting queries).
POLL_SECONDS = 2.0
# A stream of a session lasts while the session lives (checked without counting as a request:
# an open page must not keep it from going idle); one of an API token at most this long, after
# which the client opens a new one, checked again.
TOKEN_STREAM_SECONDS = 300.0
CHART_WIDTH = 480
CHART_HEIGHT = 120
SERIES = (("indexed_per_hour", "Mail indexed"), ("replies_sent_per_hour", "Replies sent"))


def _overview(call: Call) -> Overview:
    watching = watched_folders(call.context.settings.state_dir)
    with reading(call.context.engine) as conn:
        return overview(conn, watching=watching, now=call.context.clock())


def _statuses(call: Call, accounts: tuple[AccountConfig, ...]) -> list[AccountStatus]:
    """Each account's state, messages, last sync and last error, as ``emailops accounts list``."""
    with reading(call.context.engine) as conn:
        return account_statuses(conn, accounts)


def _names(accounts: tuple[AccountConfig, ...]) -> dict[str, str]:
    """The name of each account by its key in the index tables."""
    return {account.index_key: account.name for account in accounts}


def _folders(call: Call, seen: Overview, names: dict[str, str]) -> list[dict[str, object]]:
    return [
        {
            "id": f"{folder.account}/{folder.folder}",
            "url": call.url(f"/#folder-{folder.account}/{folder.folder}"),
            "state": _state(folder.mode, folder.error, folder.last_sync_at),
            # The account's name (its key when the deployment has no such account any more).
            "account_name": names.get(folder.account, folder.account),
            **asdict(folder),
        }
        for folder in seen.folders
    ]


def _state(mode: str | None, error: str | None, last_sync_at: datetime | None) -> str:
    if error is not None:
        return "failing"
    if mode is not None:
        return "watched"
    return "not watched" if last_sync_at is not None else "never synced"


def _hours(call: Call) -> list[datetime]:
    now = call.context.clock().astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return [now - timedelta(hours=HOURS - 1 - index) for index in range(HOURS)]


def _chart(seen: Overview) -> dict[str, object]:
    """The bars of each hour (two series side by side), scaled to the busiest hour."""
    series = [getattr(seen, key) for key, _ in SERIES]
    top = max(1, *(n for counts in series for n in counts))
    slot = CHART_WIDTH / HOURS
    bars = []
    for which, counts in enumerate(series):
        for hour, count in enumerate(counts):
            height = round(count / top * (CHART_HEIGHT - 10), 1)
            x = round(hour * slot + 2 + which * (slot - 4) / 2, 1)
            bars.append({"series": which, "x": x, "y": CHART_HEIGHT - height, "height": height})
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bar": round((slot - 4) / 2, 1),
        "top": top,
        "bars": bars,
    }


def _live_values(call: Call) -> dict[str, object]:
    seen = _overview(call)
    accounts = deployment_accounts_of(call)
    return {
        "seen": seen,
        "accounts": _statuses(call, accounts),
        "every": ALL,
        "folders": _folders(call, seen, _names(accounts)),
        "hours": list(zip(_hours(call), seen.indexed_per_hour, seen.replies_sent_per_hour, strict=True)),
        "chart": _chart(seen),
        "series": [label for _, label in SERIES],
    }


def overview_page(call: Call, status_code: int = 200, notice: str | None = None) -> Response:
    return call.render(
        "overview.html",
        status_code,
        notice=notice,
        error=notice if status_code >= 400 else None,
        **_live_values(call),
    )


def overview_api(call: Call) -> Response:
    seen = _overview(call)
    counts = {
        "outbox_unknown": seen.outbox_unknown,
        "quarantined": seen.quarantined,
        "drafts_pending": seen.drafts_pending,
        "drafts_failed": seen.drafts_failed,
    }
    hours = [
        {
            "id": hour.isoformat(),
            "url": call.url(f"/#hour-{hour:%H}"),
            "indexed": indexed,
            "replies_sent": sent,
        }
        for hour, indexed, sent in zip(
            _hours(call), seen.indexed_per_hour, seen.replies_sent_per_hour, strict=True
        )
    ]
    folders = _folders(call, seen, _names(deployment_accounts_of(call)))
    return call.json({"id": "overview", "url": call.url("/"), "folders": folders, **counts, "hours": hours})


def accounts_api(call: Call) -> Response:
    """Every account of the deployment with its state and folders (by name; an account the
    deployment no longer has but whose folders the index still holds, by its key)."""
    accounts = deployment_accounts_of(call)
    names = _names(accounts)
    folders = _folders(call, _overview(call), names)
    statuses = {status.name: status for status in _statuses(call, accounts)}
    keys = {name: key for key, name in names.items()}
    listed = list(statuses) + sorted({str(f["account_name"]) for f in folders} - set(statuses))
    return call.json(
        {
            "id": "accounts",
            "url": call.url("/"),
            "accounts": [
                {
                    "id": name,
                    "url": call.url(f"/#account-{name}"),
                    "key": keys.get(name, name),
                    **({} if name not in statuses else _status_json(statuses[name])),
                    "folders": [folder for folder in folders if folder["account_name"] == name],
                }
                for name in listed
            ],
        }
    )


def _status_json(status: AccountStatus) -> dict[str, object]:
    shown = asdict(status)
    del shown["name"], shown["folders"]  # the id, and the folders listed with their state
    return shown


def _fetch(call: Call) -> tuple[str, int] | Response:
    """Ask for a fetch of the form's folder of the account the form names (the folder's row's)."""
    folder = call.form.get("folder", "")
    acting = acting_choice(call)
    if isinstance(acting, Response):
        return acting
    if not request_fetch(call.context.engine, folder, account=acting.key, actor=actor_of(call)):
        return f"No folder {folder!r} of {acting.value} in the index.", 404
    return f"Fetch of {folder} of {acting.value} asked: its worker syncs it within seconds.", 200


def fetch_form(call: Call) -> Response:
    fetched = _fetch(call)
    if isinstance(fetched, Response):
        return fetched
    notice, status = fetched
    return overview_page(call, status, notice)


def fetch_api(call: Call) -> Response:
    fetched = _fetch(call)
    if isinstance(fetched, Response):
        return fetched
    notice, status = fetched
    folder = call.form.get("folder", "")
    key = "done" if status == 200 else "error"
    return call.json({"id": folder, "url": call.url(f"/#folder-{folder}"), key: notice}, status)


def _live_fragment(call: Call) -> str:
    template = call.context.templates.get_template("overview_live.html")
    return template.render(**call.template_values(), **_live_values(call))


def _event(fragment: str) -> str:
    return "event: overview\n" + "".join(f"data: {line}\n" for line in fragment.splitlines()) + "\n"


def _stream(call: Call) -> Iterator[str]:
    """The live part now, then again each time it changes, while the session lives (an API
    token's: for TOKEN_STREAM_SECONDS)."""
    session_id = call.identity.session_id if call.identity is not None else None
    context = call.context
    ends = time.monotonic() + TOKEN_STREAM_SECONDS
    sent = None
    while session_id is not None or time.monotonic() < ends:
        if session_id is not None and not session_alive(
            context.engine, session_id, context.clock(), context.session_limits
        ):
            return
        fragment = _live_fragment(call)
        if fragment != sent:
            sent = fragment
            yield _event(fragment)
        else:
            yield ": still here\n\n"  # a comment: a closed connection shows at the next write
        time.sleep(POLL_SECONDS)


def events(call: Call) -> Response:
    """A stream for an EventSource (it asks for text/event-stream); one event to anyone else."""
    if "text/event-stream" not in call.request.headers.get("accept", ""):
        return Response(_event(_live_fragment(call)), media_type="text/event-stream")
    return StreamingResponse(_stream(call), media_type="text/event-stream")


ROUTES = [
    ConsoleRoute("/", overview_page, Action.VIEW_OVERVIEW, nav="Overview"),
    ConsoleRoute("/api/v1/overview", overview_api, Action.VIEW_OVERVIEW),
    ConsoleRoute("/api/v1/accounts", accounts_api, Action.VIEW_OVERVIEW),
    ConsoleRoute("/events", events, Action.VIEW_OVERVIEW),
    ConsoleRoute("/folders/fetch", fetch_form, Action.FETCH_NOW, methods=("POST",)),
    ConsoleRoute("/api/v1/folders/fetch", fetch_api, Action.FETCH_NOW, methods=("POST",)),
]
