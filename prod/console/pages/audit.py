"""The audit log (admin): newest first, filtered by actor, action and a start date or span."""

from __future__ import annotations

import argparse
from datetime import datetime

from starlette.responses import Response

from emailops.audit import AuditEntry, list_entries
from emailops.store.database import reading
from emailops.users.permissions import Action
from prod.cli_users import since_moment
from prod.console.calls import Call, ConsoleRoute

PAGE_SIZE = 200


class _BadFilter(ValueError):
    pass


def _entries(call: Call) -> list[AuditEntry]:
    query = call.request.query_params
    since: datetime | None = None
    if query.get("since"):
        try:
            since = since_moment(query["since"])
        except argparse.ArgumentTypeError as exc:
            raise _BadFilter(f"since: {exc}") from None
    with reading(call.context.engine) as conn:
        return list_entries(
            conn,
            since=since,
            actions=[query["action"]] if query.get("action") else (),
            actor=query.get("actor") or None,
            limit=PAGE_SIZE,
        )


def _entry(call: Call, entry: AuditEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "url": call.url(f"/audit#entry-{entry.id}"),
        "at": entry.at,
        "actor": entry.actor,
        "role": entry.role,
        "source": entry.source,
        "action": entry.action,
        "target": entry.target,
        "before": entry.before,
        "after": entry.after,
    }


def audit_page(call: Call) -> Response:
    query = call.request.query_params
    filters = {key: query.get(key, "") for key in ("actor", "action", "since")}
    try:
        entries = [_entry(call, entry) for entry in _entries(call)]
    except _BadFilter as exc:
        return call.render("audit.html", 400, entries=[], filters=filters, error=str(exc))
    return call.render("audit.html", entries=entries, filters=filters, error=None)


def audit_api(call: Call) -> Response:
    try:
        entries = [_entry(call, entry) for entry in _entries(call)]
    except _BadFilter as exc:
        return call.json({"id": "audit", "url": call.url("/audit"), "error": str(exc)}, 400)
    return call.json({"id": "audit", "url": call.url("/audit"), "entries": entries})


ROUTES = [
    ConsoleRoute("/audit", audit_page, Action.VIEW_AUDIT, nav="Audit log"),
    ConsoleRoute("/api/v1/audit", audit_api, Action.VIEW_AUDIT),
]
