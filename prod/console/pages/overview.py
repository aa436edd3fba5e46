"""The landing page: the folders the index watches and when each last synced."""

from __future__ import annotations

from starlette.responses import Response

from emailops.store.database import reading
from emailops.store.folders import list_folders
from emailops.users.permissions import Action
from prod.console.calls import Call, ConsoleRoute


def _folders(call: Call) -> list[dict[str, object]]:
    with reading(call.context.engine) as conn:
        found = list_folders(conn)
    return [
        {
            "id": folder.id,
            "url": call.url(f"/#folder-{folder.id}"),
            "account": folder.account,
            "name": folder.name,
            "last_sync_at": folder.last_sync_at,
        }
        for folder in found
    ]


def overview_page(call: Call) -> Response:
    return call.render("overview.html", folders=_folders(call))


def overview_api(call: Call) -> Response:
    return call.json({"id": "overview", "url": call.url("/"), "folders": _folders(call)})


ROUTES = [
    ConsoleRoute("/", overview_page, Action.VIEW_OVERVIEW, nav="Overview"),
    ConsoleRoute("/api/v1/overview", overview_api, Action.VIEW_OVERVIEW),
]
