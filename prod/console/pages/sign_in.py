"""Signing in and out, and ``/healthz``.

A sign-in is refused before its password is looked at when the name is locked or the address
throttled (429, ``emailops.users.sign_in_throttle``). Wrong name, wrong password and disabled user
get the same answer in the same time (a dummy hash is checked for unknown names). With
``WEB_PASSWORD_LOGIN=false`` the form is not shown and every POST refused (single sign-on only).
The session id is new at every sign-in (any session the browser had is ended). Every attempt, sign-out and
lockout is one audit row and line.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from typing import Any

from sqlalchemy import text
from starlette.responses import JSONResponse, RedirectResponse, Response

from emailops.audit import Actor, record
from emailops.store.database import reading
from emailops.users import sign_in_throttle
from emailops.users.accounts import verify_sign_in
from emailops.users.sessions import end_session, start_session
from prod.console.calls import Access, Call, ConsoleRoute
from prod.logging_setup import get_logger

log = get_logger("console")

WRONG = "Wrong username or password."
PASSWORD_OFF = "Password sign-in is off: use single sign-on."  # noqa: S105 (a message)
THROTTLED = "Too many failed sign-ins. Try again later, or ask an admin to lift the lockout."
# Each check holds 64 MiB for Argon2id: at most this many at once, whatever comes in.
_CHECKS = threading.BoundedSemaphore(2)
SIGN_IN_COOKIE_SECONDS = 3600
# Longest name kept in the audit log for a failed attempt (anything may be typed there).
_NAME_IN_AUDIT = 100


def local_path(target: str | None) -> str:
    """Where to go after signing in: a path of the console only, never another site."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


def sign_in_form(call: Call, status_code: int = 200, error: str | None = None) -> Response:
    """The sign-in page: the password form (unless WEB_PASSWORD_LOGIN=false), the single sign-on
    link (with WEB_OIDC_ISSUER), and ``error`` if any."""
    token = secrets.token_urlsafe(32)
    settings = call.context.settings
    response = call.render(
        "sign_in.html",
        status_code=status_code,
        error=error,
        sign_in_token=token,
        next_path=local_path(call.request.query_params.get("next") or call.form.get("next")),
        password_login=settings.web_password_login,
        single_sign_on=bool(settings.web_oidc_issuer),
    )
    response.set_cookie(
        call.context.sign_in_cookie,
        token,
        max_age=SIGN_IN_COOKIE_SECONDS,
        httponly=True,
        samesite="strict",
        secure=call.context.secure_cookies,
    )
    return response


def sign_in_page(call: Call) -> Response:
    return sign_in_form(call)


def audit_attempt(call: Call, name: str, action: str, **after: Any) -> None:
    actor = Actor(name=name[:_NAME_IN_AUDIT] or "-", role="-", source=call.source)
    record(call.context.engine, actor, action, name[:_NAME_IN_AUDIT] or None, after=after or None)


def sign_in(call: Call) -> Response:
    context = call.context
    if not context.settings.web_password_login:
        audit_attempt(
            call, call.form.get("username", "").strip(), "sign_in.failure", reason="password sign-in is off"
        )
        return sign_in_form(call, 403, PASSWORD_OFF)
    # Login CSRF: the form's token must be the one this browser got with the form.
    expected = call.request.cookies.get(context.sign_in_cookie, "")
    given = call.form.get("sign_in_token", "")
    if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
        return sign_in_form(call, 403, "The sign-in form expired. Please try again.")
    name = call.form.get("username", "").strip()
    password = call.form.get("password", "")
    now = context.clock()
    with reading(context.engine) as conn:
        refused = sign_in_throttle.refused(conn, name, call.source, now, context.throttle)
    if refused:
        audit_attempt(call, name, "sign_in.failure", reason="throttled")
        response = sign_in_form(call, 429, THROTTLED)
        response.headers["Retry-After"] = str(int(context.throttle.window.total_seconds()))
        return response
    with _CHECKS:
        user = verify_sign_in(context.engine, name, password)
    if user is None:
        locked = sign_in_throttle.record_failure(context.engine, name, call.source, now, context.throttle)
        audit_attempt(call, name, "sign_in.failure", reason="wrong username or password")
        if locked:
            audit_attempt(call, name, "sign_in.lockout")
        return sign_in_form(call, 401, WRONG)
    sign_in_throttle.record_success(context.engine, name)
    response = RedirectResponse(
        context.settings.web_base_url + local_path(call.form.get("next")), status_code=303
    )
    open_session(call, user.name, response)
    response.delete_cookie(context.sign_in_cookie, secure=context.secure_cookies, samesite="strict")
    return response


def open_session(call: Call, user_name: str, response: Response, **audited: Any) -> None:
    """Sign ``user_name`` in: a new session (any the browser had is ended), its cookie on
    ``response``, and the audit row ``sign_in.success`` (with ``audited`` as its after)."""
    context = call.context
    old = call.request.cookies.get(context.session_cookie)
    if old:
        end_session(context.engine, old)
    session_id, session = start_session(context.engine, user_name, call.source, context.clock())
    actor = Actor(name=user_name, role=session.role.value, source=call.source)
    record(context.engine, actor, "sign_in.success", user_name, after=audited or None)
    response.set_cookie(
        context.session_cookie,
        session_id,
        max_age=context.settings.web_session_max_hours * 3600,
        httponly=True,
        samesite="strict",
        secure=context.secure_cookies,
    )


def sign_out(call: Call) -> Response:
    identity = call.identity
    assert identity is not None
    if identity.session_id is not None:
        end_session(call.context.engine, identity.session_id)
    actor = Actor(identity.name, identity.role.value, call.source)
    record(call.context.engine, actor, "sign_out", identity.name)
    response = RedirectResponse(call.context.settings.web_base_url + "/sign-in", status_code=303)
    response.delete_cookie(
        call.context.session_cookie, httponly=True, secure=call.context.secure_cookies, samesite="strict"
    )
    return response


def healthz(call: Call) -> Response:
    """200 when the console answers and reads the index, else 503; no details for anyone."""
    try:
        with reading(call.context.engine) as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        log.exception("healthz: the index cannot be read")
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


ROUTES = [
    ConsoleRoute("/sign-in", sign_in_page, Access.PUBLIC),
    ConsoleRoute("/sign-in", sign_in, Access.PUBLIC, methods=("POST",)),
    ConsoleRoute("/sign-out", sign_out, Access.SIGNED_IN, methods=("POST",)),
    ConsoleRoute("/healthz", healthz, Access.PUBLIC),
]
