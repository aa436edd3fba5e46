"""Accounts (admin): every mailbox of the deployment (the index's and the EMAIL_* one) with its
settings, secrets masked, its state and last error in full; "Test connection" (what ``emailops
accounts test`` does, with the servers' own answers), "Fetch now", enable/disable (the functions
``emailops accounts enable|disable`` calls), each audited. An OAuth2 account is reconnected in the
browser: ``/accounts/{name}/reconnect`` sends the admin to the account's authorization endpoint
(code flow with PKCE, ``emailops.auth.authorization_code``), whose redirect back to
``/oauth2/callback`` stores the new grant. The callback comes from another site, so the session's
``SameSite=Strict`` cookie is not sent with it: the flow is found by its ``state``, which must
also be in a short-lived ``SameSite=Lax`` cookie of the browser that started it (as OIDC sign-in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from emailops.accounts.config import AccountConfig
from emailops.accounts.fields import AccountError
from emailops.accounts.status import AccountStatus, account_statuses
from emailops.accounts.store import set_enabled
from emailops.actions.messages import request_fetch
from emailops.audit import Actor, record
from emailops.auth import authorization_code
from emailops.auth.authorization_code import PendingAuthorization
from emailops.auth.errors import OAuth2Error
from emailops.config import OAuth2Flow
from emailops.store.database import reading
from emailops.users.permissions import Action
from prod.cli_accounts import choose_account, deployment_accounts, shown_settings, stored_name, try_sign_in
from prod.cli_common import CommandError
from prod.console.calls import Access, Call, ConsoleRoute
from prod.console.pages.actor import actor_of
from prod.console.pending import FlowCookie, PendingFlows
from prod.oauth2_tokens import account_token_source

CALLBACK_PATH = "/oauth2/callback"
PENDING_SECONDS = 600
RECONNECT_ACTION = "account.oauth_reconnect"
TEST_ACTION = "account.test"
_PENDING: PendingFlows[tuple[PendingAuthorization, Actor]] = PendingFlows(PENDING_SECONDS)
_COOKIE = FlowCookie("emailops_reconnect", PENDING_SECONDS)


def _accounts(call: Call) -> list[AccountConfig]:
    with reading(call.context.engine) as conn:
        return deployment_accounts(call.context.settings, conn)


def _find(call: Call, name: str) -> AccountConfig | None:
    return next((account for account in _accounts(call) if account.name == name), None)


def _page_url(call: Call, name: str) -> str:
    return call.url(f"/accounts/{name}")


def _reconnectable(account: AccountConfig) -> bool:
    return account.oauth2 is not None and account.oauth2.flow is OAuth2Flow.REFRESH_TOKEN


def _views(call: Call, accounts: list[AccountConfig]) -> list[dict[str, Any]]:
    """What the page and the API show of each account: never a secret."""
    with reading(call.context.engine) as conn:
        statuses = account_statuses(conn, accounts)
    return [_view(call, account, status) for account, status in zip(accounts, statuses, strict=True)]


def _view(call: Call, account: AccountConfig, status: AccountStatus) -> dict[str, Any]:
    return {
        "id": account.name,
        "url": _page_url(call, account.name),
        "name": account.name,
        "username": account.username,
        "auth": account.auth,
        "enabled": account.enabled,
        "state": status.state,
        "last_error": status.last_error,
        "last_sync": status.last_sync,
        "messages": status.messages,
        "folders": list(account.folders),
        "reconnect": _reconnectable(account),
        "settings": shown_settings(call.context.settings, call.context.engine, account),
    }


# -- reading -----------------------------------------------------------------------------------


def accounts_page(call: Call) -> Response:
    try:
        views = _views(call, _accounts(call))
    except CommandError as exc:
        return call.render("accounts.html", 500, accounts=[], error=str(exc))
    return call.render("accounts.html", accounts=views, error=None)


def _account_page(
    call: Call, name: str, status_code: int = 200, notice: str | None = None, **shown: Any
) -> Response:
    account = _find(call, name)
    if account is None:
        return call.render("accounts.html", 404, accounts=[], error=f"No account {name!r}.")
    return call.render(
        "account.html",
        status_code,
        account=_views(call, [account])[0],
        notice=notice,
        error=notice if status_code >= 400 else None,
        **shown,
    )


def account_page(call: Call) -> Response:
    return _account_page(call, call.request.path_params["name"])


def account_api(call: Call) -> Response:
    name = call.request.path_params["name"]
    account = _find(call, name)
    if account is None:
        return call.json({"id": name, "url": _page_url(call, name), "error": f"no account {name!r}"}, 404)
    return call.json(_views(call, [account])[0])


# -- actions -----------------------------------------------------------------------------------


def _answer(call: Call, notice: str, status_code: int = 200, **shown: Any) -> Response:
    """The API's JSON object, or the account's page with the notice."""
    name = call.request.path_params["name"]
    if call.request.url.path.startswith("/api/"):
        key = "error" if status_code >= 400 else "done"
        return call.json({"id": name, "url": _page_url(call, name), key: notice, **shown}, status_code)
    return _account_page(call, name, status_code, notice, **shown)


def _acting(call: Call, act: Callable[[AccountConfig], tuple[str, int, dict[str, Any]]]) -> Response:
    name = call.request.path_params["name"]
    try:
        account = _find(call, name)
        if account is None:
            return _answer(call, f"No account {name!r}.", 404)
        notice, status_code, shown = act(account)
    except (AccountError, CommandError) as exc:
        return _answer(call, str(exc), 400)
    return _answer(call, notice, status_code, **shown)


def test_connection(call: Call) -> Response:
    def act(account: AccountConfig) -> tuple[str, int, dict[str, Any]]:
        _, result = try_sign_in(call.context.settings, call.context.engine, account.name)
        answer = {
            "ok": result.ok,
            "imap_server": f"{account.imap.host}:{account.imap.port}",
            "imap_folders": list(result.imap_folders),
            "imap_error": result.imap_error,
            "smtp_server": f"{account.smtp.host}:{account.smtp.port}",
            "smtp_error": result.smtp_error,
        }
        record(call.context.engine, actor_of(call), TEST_ACTION, account.name, after=answer)
        notice = "Both servers accepted the sign-in." if result.ok else "A server refused or failed."
        return notice, 200, {"test": answer}

    return _acting(call, act)


def fetch_now(call: Call) -> Response:
    def act(account: AccountConfig) -> tuple[str, int, dict[str, Any]]:
        asked = [
            folder
            for folder in account.folders
            if request_fetch(call.context.engine, folder, account=account.index_key, actor=actor_of(call))
        ]
        if not asked:
            return f"No folder of {account.name} is in the index yet: nothing to fetch.", 404, {}
        return f"Fetch of {', '.join(asked)} asked: the workers sync within seconds.", 200, {}

    return _acting(call, act)


def _set_enabled(call: Call, enabled: bool) -> Response:
    def act(account: AccountConfig) -> tuple[str, int, dict[str, Any]]:
        name = stored_name(call.context.settings, account.name)
        done = set_enabled(call.context.engine, name, enabled, actor=actor_of(call))
        what = "enabled" if enabled else "disabled"
        return (f"{name} is {what}." if done else f"{name} was {what} already."), 200, {}

    return _acting(call, act)


def enable(call: Call) -> Response:
    return _set_enabled(call, True)


def disable(call: Call) -> Response:
    return _set_enabled(call, False)


# -- OAuth2 reconnect --------------------------------------------------------------------------


def reconnect(call: Call) -> Response:
    """Send the browser to the account's authorization endpoint (a link, not a form: the CSP's
    form-action keeps forms on the console, redirects after them included)."""
    name = call.request.path_params["name"]
    settings, engine = call.context.settings, call.context.engine
    try:
        account = _find(call, name)
        if account is None:
            return _account_page(call, name)
        if not _reconnectable(account):
            return _account_page(call, name, 400, f"{name} does not sign in with an OAuth2 refresh token.")
        account = _with_secrets(call, name)
        source = account_token_source(account, settings.deployment(), engine)
        assert source is not None
        url, pending = authorization_code.start(source, name, call.url(CALLBACK_PATH))
    except (AccountError, CommandError, OAuth2Error) as exc:
        return _account_page(call, name, 400, str(exc))
    _PENDING.put(pending.state, (pending, actor_of(call)))
    return _COOKIE.redirect(url, pending.state, secure=call.context.secure_cookies)


def _with_secrets(call: Call, name: str) -> AccountConfig:
    """The account with its secrets (the client secret the code exchange needs)."""
    return choose_account(call.context.settings, call.context.engine, name, secrets=True)


def _finished(call: Call, status_code: int, name: str | None, error: str | None) -> Response:
    response = call.render(
        "reconnected.html",
        status_code,
        name=name,
        target=call.url(f"/accounts/{name}") if name else call.url("/accounts"),
        failure=error,
    )
    _COOKIE.forget(response, secure=call.context.secure_cookies)
    return response


def callback(call: Call) -> Response:
    """The authorization server's redirect back: check the state, exchange the code, store the
    grant; audited as the admin who started it (success and failure)."""
    query = call.request.query_params
    state = query.get("state", "")
    if not _COOKIE.matches(call.request, state, secure=call.context.secure_cookies):
        return _finished(call, 400, None, "this reconnect was not started in this browser")
    taken = _PENDING.take(state)
    if taken is None:
        return _finished(call, 400, None, "this reconnect is unknown, used or expired: start it again")
    pending, actor = taken
    name = pending.account
    try:
        if "error" in query:
            # Words from the address bar (anyone's), kept short.
            said = f"{query['error'][:100]}: {query.get('error_description', '')[:300]}".strip(" :")
            raise _Refused(f"the authorization server answered {said}")
        account = _with_secrets(call, name)
        with reading(call.context.engine) as conn:
            (before,) = account_statuses(conn, [account])
        source = account_token_source(account, call.context.settings.deployment(), call.context.engine)
        assert source is not None
        authorization_code.finish(source, pending, query.get("code", ""))
    except (_Refused, OAuth2Error, AccountError, CommandError) as exc:
        record(call.context.engine, actor, RECONNECT_ACTION, name, after={"ok": False, "error": str(exc)})
        return _finished(call, 502, name, str(exc))
    with reading(call.context.engine) as conn:
        (after,) = account_statuses(conn, [account])
    record(
        call.context.engine,
        actor,
        RECONNECT_ACTION,
        name,
        before={"state": before.state},
        after={"state": after.state},
    )
    return _finished(call, 200, name, None)


class _Refused(Exception):
    """The authorization server sent the browser back with an error instead of a code."""


ROUTES = [
    ConsoleRoute("/accounts", accounts_page, Action.MANAGE_ACCOUNTS, nav="Accounts"),
    ConsoleRoute("/accounts/{name}", account_page, Action.MANAGE_ACCOUNTS),
    ConsoleRoute("/api/v1/accounts/{name}", account_api, Action.MANAGE_ACCOUNTS),
    ConsoleRoute("/accounts/{name}/test", test_connection, Action.MANAGE_ACCOUNTS, methods=("POST",)),
    ConsoleRoute("/api/v1/accounts/{name}/test", test_connection, Action.MANAGE_ACCOUNTS, methods=("POST",)),
    ConsoleRoute("/accounts/{name}/fetch", fetch_now, Action.FETCH_NOW, methods=("POST",)),
    ConsoleRoute("/api/v1/accounts/{name}/fetch", fetch_now, Action.FETCH_NOW, methods=("POST",)),
    ConsoleRoute("/accounts/{name}/enable", enable, Action.MANAGE_ACCOUNTS, methods=("POST",)),
    ConsoleRoute("/api/v1/accounts/{name}/enable", enable, Action.MANAGE_ACCOUNTS, methods=("POST",)),
    ConsoleRoute("/accounts/{name}/disable", disable, Action.MANAGE_ACCOUNTS, methods=("POST",)),
    ConsoleRoute("/api/v1/accounts/{name}/disable", disable, Action.MANAGE_ACCOUNTS, methods=("POST",)),
    ConsoleRoute("/accounts/{name}/reconnect", reconnect, Action.MANAGE_ACCOUNTS),
    ConsoleRoute(CALLBACK_PATH, callback, Access.PUBLIC),
]
