"""The settings in force, read-only, every secret masked (``RuntimeSettings.masked``, as
``emailops check-config`` shows them)."""

from __future__ import annotations

from starlette.responses import Response

from emailops.users.permissions import Action
from prod.console.calls import Call, ConsoleRoute


def _settings(call: Call) -> list[dict[str, object]]:
    return [
        {"id": name, "url": call.url(f"/settings#{name}"), "name": name, "value": value}
        for name, value in sorted(call.context.settings.masked().items())
    ]


def settings_page(call: Call) -> Response:
    return call.render("settings.html", settings=_settings(call))


def settings_api(call: Call) -> Response:
    return call.json({"id": "settings", "url": call.url("/settings"), "settings": _settings(call)})


ROUTES = [
    ConsoleRoute("/settings", settings_page, Action.VIEW_SETTINGS, nav="Settings"),
    ConsoleRoute("/api/v1/settings", settings_api, Action.VIEW_SETTINGS),
]
