"""The console's ASGI application: the route table, each route guarded, in the request frame."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from prod.console.calls import ConsoleContext, ConsoleRoute, Identity
from prod.console.frame import RequestFrame
from prod.console.guard import guarded
from prod.console.metrics import HttpMetrics
from prod.console.pages import (
    accounts,
    audit,
    drafts,
    messages,
    oidc_sign_in,
    outbox,
    overview,
    quarantine,
    rules,
    settings,
    sign_in,
    users,
)

STATIC = Path(__file__).resolve().parent / "static"

# Every address of the console with the permission it needs (the tests enumerate it).
ROUTE_TABLE: tuple[ConsoleRoute, ...] = (
    *sign_in.ROUTES,
    *oidc_sign_in.ROUTES,
    *overview.ROUTES,
    *messages.ROUTES,
    *outbox.ROUTES,
    *quarantine.ROUTES,
    *drafts.ROUTES,
    *rules.ROUTES,
    *accounts.ROUTES,
    *users.ROUTES,
    *audit.ROUTES,
    *settings.ROUTES,
)


def navigation(identity: Identity | None) -> list[tuple[str, str]]:
    """(label, path) of each page the user's role may open."""
    if identity is None:
        return []
    return [(route.nav, route.path) for route in ROUTE_TABLE if route.nav and route.allows(identity.role)]


def create_app(context: ConsoleContext, metrics: HttpMetrics | None = None) -> ASGIApp:
    routes: list[BaseRoute] = [
        Route(route.path, guarded(route, context, navigation), methods=list(route.methods))
        for route in ROUTE_TABLE
    ]
    routes.append(Mount("/static", app=StaticFiles(directory=STATIC), name="static"))
    middleware = []
    base_host = urlsplit(context.settings.web_base_url).hostname
    if base_host:
        # Behind its proxy the console answers for its own name only (no DNS rebinding).
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=[base_host]))
    app = Starlette(routes=routes, middleware=middleware)
    return RequestFrame(app, metrics or HttpMetrics(enabled=False), https=context.secure_cookies)
