"""Single sign-on through an OpenID Connect provider (``WEB_OIDC_ISSUER``; 404 without it).

``/sign-in/oidc`` sends the browser to the provider; what the callback must match (state, nonce,
PKCE verifier) stays in this process, found by the state, which is also in a short-lived
``HttpOnly`` cookie (``SameSite=Lax``: the provider's redirect back is a cross-site navigation).
The callback is accepted once, within ``PENDING_SECONDS``, from the browser that started it.
The verified user's groups give the role (``WEB_OIDC_ROLE_MAP``); no mapped group, a user who
may not sign in, or any failed check is refused with the sign-in page and one audit row, like a
password sign-in. Success opens a normal console session.
"""

from __future__ import annotations

from starlette.responses import Response

from emailops.users.accounts import UserError
from emailops.users.oidc import OidcClient, OidcConfig, OidcError, PendingSignIn
from emailops.users.oidc_accounts import sign_in_oidc_user
from prod.console.calls import Access, Call, ConsoleRoute
from prod.console.pages.sign_in import audit_attempt, local_path, open_session, sign_in_form
from prod.console.pending import FlowCookie, PendingFlows

CALLBACK_PATH = "/sign-in/oidc/callback"
PENDING_SECONDS = 600
# Sign-ins started but not finished kept at most (the oldest dropped): anyone may start one.
MAX_PENDING = 10_000
NO_ROLE = "Your account at the identity provider is in no group that may use this console."
FAILED = "Single sign-on failed. Please try again."


_PENDING: PendingFlows[tuple[PendingSignIn, str]] = PendingFlows(PENDING_SECONDS, MAX_PENDING)
_COOKIE = FlowCookie("emailops_oidc", PENDING_SECONDS)
_CLIENTS: dict[OidcConfig, OidcClient] = {}


def _client(call: Call) -> OidcClient | None:
    config = call.context.settings.oidc_config()
    if config is None:
        return None
    return _CLIENTS.setdefault(config, OidcClient(config))


def start(call: Call) -> Response:
    client = _client(call)
    if client is None:
        return Response("single sign-on is not configured", status_code=404, media_type="text/plain")
    try:
        url, pending = client.start(call.url(CALLBACK_PATH))
    except OidcError as exc:
        audit_attempt(call, "", "sign_in.failure", via="oidc", reason=str(exc))
        return sign_in_form(call, 502, FAILED)
    _PENDING.put(pending.state, (pending, local_path(call.request.query_params.get("next"))))
    return _COOKIE.redirect(url, pending.state, secure=call.context.secure_cookies)


def _refused(call: Call, name: str, reason: str, message: str = FAILED) -> Response:
    audit_attempt(call, name, "sign_in.failure", via="oidc", reason=reason)
    response = sign_in_form(call, 403, message)
    _COOKIE.forget(response, secure=call.context.secure_cookies)
    return response


def callback(call: Call) -> Response:
    client = _client(call)
    if client is None:
        return Response("single sign-on is not configured", status_code=404, media_type="text/plain")
    query = call.request.query_params
    state = query.get("state", "")
    if not _COOKIE.matches(call.request, state, secure=call.context.secure_cookies):
        return _refused(call, "", "state does not match this browser's sign-in")
    taken = _PENDING.take(state)
    if taken is None:
        return _refused(call, "", "sign-in unknown, used or expired")
    pending, next_path = taken
    if "error" in query:
        return _refused(call, "", f"the identity provider answered {query['error'][:100]!r}")
    try:
        identity = client.finish(pending, query.get("code", ""))
    except OidcError as exc:
        return _refused(call, "", str(exc))
    role = client.config.role_for(identity.groups)
    if role is None:
        return _refused(call, identity.name, "no group maps to a role", NO_ROLE)
    try:
        user = sign_in_oidc_user(call.context.engine, identity.name, role, source=call.source)
    except UserError as exc:
        return _refused(call, identity.name, str(exc))
    target = call.url(next_path)
    # A page, not a redirect: the redirect chain began at the provider, and browsers would not
    # send the new SameSite=Strict cookie along it.
    response = call.render("signed_in.html", target=target)
    open_session(call, user.name, response, via="oidc", role=user.role.value)
    _COOKIE.forget(response, secure=call.context.secure_cookies)
    return response


ROUTES = [
    ConsoleRoute("/sign-in/oidc", start, Access.PUBLIC),
    ConsoleRoute(CALLBACK_PATH, callback, Access.PUBLIC),
]
