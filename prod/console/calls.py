"""What a console handler gets (``Call``) and what a route declares (``ConsoleRoute``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from emailops.clock import Clock
from emailops.users.permissions import Action, Role, allowed
from emailops.users.sessions import SessionLimits
from emailops.users.sign_in_throttle import ThrottlePolicy
from prod.runtime_settings import RuntimeSettings

TEMPLATES = Path(__file__).resolve().parent / "templates"


class Access(StrEnum):
    """Routes that need no ``Action``: open to anyone, or to anyone signed in."""

    PUBLIC = "public"
    SIGNED_IN = "signed_in"


Permission = Action | Access


@dataclass(frozen=True)
class Identity:
    """Who asks: a signed-in session (with its CSRF token) or an API token."""

    name: str
    role: Role
    via_token: bool
    csrf_token: str | None = None
    session_id: str | None = None


@dataclass
class ConsoleContext:
    """What every request shares: the settings, the index and the console's policies."""

    settings: RuntimeSettings
    engine: Engine
    clock: Clock
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    templates: Environment = field(
        default_factory=lambda: Environment(
            loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True)
        )
    )

    @property
    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            idle=timedelta(minutes=self.settings.web_session_idle_minutes),
            absolute=timedelta(hours=self.settings.web_session_max_hours),
        )

    @property
    def secure_cookies(self) -> bool:
        return self.settings.web_base_url.startswith("https://")

    @property
    def session_cookie(self) -> str:
        # __Host-: the browser keeps it to this host and path /, and only over https.
        return "__Host-emailops_session" if self.secure_cookies else "emailops_session"

    @property
    def sign_in_cookie(self) -> str:
        return "__Host-emailops_sign_in" if self.secure_cookies else "emailops_sign_in"


def json_value(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    raise TypeError(f"not JSON: {type(value).__name__}")


@dataclass
class Call:
    request: Request
    context: ConsoleContext
    identity: Identity | None
    form: Mapping[str, str]
    nav: list[tuple[str, str]]
    # The files of a multipart form, by field name (each at most ``guard.MAX_BODY_BYTES``).
    uploads: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def source(self) -> str:
        client = self.request.client
        return client.host if client is not None else "unknown"

    def url(self, path: str) -> str:
        """The absolute address of ``path``: under WEB_BASE_URL when set, else as asked."""
        base = self.context.settings.web_base_url or str(self.request.base_url).rstrip("/")
        return base + path

    def may(self, action: Action) -> bool:
        return self.identity is not None and allowed(self.identity.role, action)

    def template_values(self) -> dict[str, Any]:
        """What every template may use: who asks, the navigation, the CSRF field, ``may``, and
        the accounts whose sign-in is refused (the banner of every signed-in page)."""
        from prod.console.refused import refused_accounts

        csrf = self.identity.csrf_token if self.identity is not None else None
        refused = (
            [] if self.identity is None else refused_accounts(self.context.settings, self.context.engine)
        )
        return {
            "refused_accounts": refused,
            "identity": self.identity,
            "nav": self.nav,
            "path": self.request.url.path,
            "csrf_token": csrf,
            "csrf_field": lambda: Markup('<input type="hidden" name="csrf_token" value="{}">').format(
                csrf or ""
            ),
            "may": self.may,
            "Action": Action,
        }

    def render(self, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        page = self.context.templates.get_template(template).render(**self.template_values(), **values)
        return HTMLResponse(page, status_code=status_code)

    def json(self, value: Mapping[str, Any], status_code: int = 200) -> Response:
        body = json.dumps(value, default=json_value, ensure_ascii=False)
        return Response(body, status_code=status_code, media_type="application/json")


Handler = Callable[[Call], Response]


@dataclass(frozen=True)
class ConsoleRoute:
    """One address of the console and the permission it needs, checked before ``handler`` runs."""

    path: str
    handler: Handler
    permission: Permission
    methods: tuple[str, ...] = ("GET",)
    # The navigation's label of a page (GET, not /api/).
    nav: str | None = None

    @property
    def is_api(self) -> bool:
        return self.path.startswith("/api/")

    def allows(self, role: Role | None) -> bool:
        if self.permission is Access.PUBLIC:
            return True
        if role is None:
            return False
        return self.permission is Access.SIGNED_IN or allowed(role, self.permission)
