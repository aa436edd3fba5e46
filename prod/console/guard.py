"""The one place where a console request is let through: who asks, may they, is it forged.

Every route of the table is wrapped by ``guarded``. Who asks comes from ``Authorization: Bearer
eo_...`` (an API token) or from the session cookie. Then: the route's permission for that role
(401/redirect to sign-in without one, 403 without the permission); for every unsafe method, the
Origin (or, without one, the Referer) must be the console's own; a session's unsafe request must
carry its synchronizer token (form field ``csrf_token`` or header ``X-CSRF-Token``). A request
with an API token needs no CSRF token: a browser never adds that header by itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from emailops.users.accounts import verify_api_token
from emailops.users.credentials import TOKEN_PREFIX
from emailops.users.sessions import find_session
from prod.console.calls import Access, Call, ConsoleContext, ConsoleRoute, Identity

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
UNAUTHENTICATED = "sign in, or send an API token (Authorization: Bearer eo_...)"
FORBIDDEN = "your role may not do this"
FOREIGN_ORIGIN = "refused: this request did not come from the console's own pages"
# The largest request body (an uploaded message included) the console reads.
MAX_BODY_BYTES = 10 * 1024 * 1024
TOO_LARGE = f"refused: the request is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB"
BAD_CSRF_TOKEN = "refused: the form's security token is missing or wrong; reload the page"  # noqa: S105 (a message)
NavBuilder = Callable[[Identity | None], list[tuple[str, str]]]


def identify(request: Request, context: ConsoleContext) -> Identity | None:
    """The API token's user or the live session's; None for anyone else."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        token = credentials.strip()
        user = verify_api_token(context.engine, token) if token.startswith(TOKEN_PREFIX) else None
        return None if user is None else Identity(name=user.name, role=user.role, via_token=True)
    session_id = request.cookies.get(context.session_cookie)
    if not session_id:
        return None
    session = find_session(context.engine, session_id, context.clock(), context.session_limits)
    if session is None:
        return None
    return Identity(
        name=session.user_name,
        role=session.role,
        via_token=False,
        csrf_token=session.csrf_token,
        session_id=session_id,
    )


def own_origin(request: Request, context: ConsoleContext) -> str:
    base = context.settings.web_base_url or str(request.base_url)
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request, context: ConsoleContext) -> bool:
    """Whether an unsafe request comes from the console's own pages (Origin, else Referer).

    A request with neither passes only with an API token: browsers send an Origin with every
    cross-site POST, and our pages' Referrer-Policy keeps the Referer for same-origin requests."""
    expected = own_origin(request, context)
    origin = request.headers.get("origin")
    if origin is not None:
        return origin.lower() == expected
    referer = request.headers.get("referer")
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}".lower() == expected
    return request.headers.get("authorization", "").lower().startswith("bearer ")


def refuse(route: ConsoleRoute, status: int, message: str) -> Response:
    if route.is_api:
        return JSONResponse({"error": message}, status_code=status)
    return Response(message, status_code=status, media_type="text/plain")


def guarded(
    route: ConsoleRoute, context: ConsoleContext, nav: NavBuilder
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        request.state.route = route.path
        unsafe = request.method not in SAFE_METHODS
        if unsafe and not same_origin(request, context):
            return refuse(route, 403, FOREIGN_ORIGIN)
        identity = None
        if route.permission is not Access.PUBLIC:
            identity = await run_in_threadpool(identify, request, context)
        request.state.user = identity.name if identity is not None else None
        if not route.allows(identity.role if identity is not None else None):
            if identity is None:
                if route.is_api or request.headers.get("authorization"):
                    return refuse(route, 401, UNAUTHENTICATED)
                back = quote(request.url.path, safe="/")
                return RedirectResponse(
                    f"{context.settings.web_base_url}/sign-in?next={back}", status_code=303
                )
            return refuse(route, 403, FORBIDDEN)
        form: dict[str, str] = {}
        uploads: dict[str, bytes] = {}
        if unsafe:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                return refuse(route, 413, TOO_LARGE)
            parsed = await request.form()
            form = {key: value for key, value in parsed.items() if isinstance(value, str)}
            for key, value in parsed.items():
                if isinstance(value, UploadFile):
                    uploads[key] = await value.read(MAX_BODY_BYTES + 1)
                    if len(uploads[key]) > MAX_BODY_BYTES:  # sent without a Content-Length
                        return refuse(route, 413, TOO_LARGE)
            if request.headers.get("content-type", "").startswith("application/json"):
                form = await _json_fields(request)
            if identity is not None and not identity.via_token and route.permission is not Access.PUBLIC:
                given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER, "")
                expected = identity.csrf_token or ""
                if not given or not hmac.compare_digest(given.encode(), expected.encode()):
                    return refuse(route, 403, BAD_CSRF_TOKEN)
        call = Call(request, context, identity, form, nav(identity), uploads)
        return await run_in_threadpool(route.handler, call)

    return endpoint


async def _json_fields(request: Request) -> dict[str, str]:
    """The text fields of a JSON object body (an API call's arguments); {} for anything else."""
    try:
        body = await request.json()
    except ValueError:
        return {}
    return (
        {key: value for key, value in body.items() if isinstance(value, str)}
        if isinstance(body, dict)
        else {}
    )
