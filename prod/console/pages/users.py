"""Users (admin): list, add, disable and enable, remove, new password, API token, lift a lockout.

Each change is the ``emailops.users`` function ``emailops users ...`` calls, recorded in the audit
log with the admin and their address. A generated password or a new API token is in the answer
to the request that made it, once; nothing shows it again.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine
from starlette.responses import Response

from emailops.store.database import reading
from emailops.users import accounts
from emailops.users.credentials import new_password
from emailops.users.permissions import Action, Role
from emailops.users.sign_in_throttle import lift_lockout, locked_names
from prod.console.calls import Call, ConsoleRoute
from prod.console.pages.actor import actor_of


def _listing(call: Call) -> tuple[list[dict[str, object]], list[str]]:
    with reading(call.context.engine) as conn:
        found = accounts.list_users(conn)
        locked = locked_names(conn)
    users: list[dict[str, object]] = [
        {
            "id": user.name,
            "url": call.url(f"/users#user-{user.name}"),
            "name": user.name,
            "role": user.role,
            "disabled": user.disabled,
            "locked": user.name in locked,
            "has_api_token": user.has_api_token,
            "token_created_at": user.token_created_at,
            "password_changed_at": user.password_changed_at,
            "created_at": user.created_at,
        }
        for user in found
    ]
    return users, locked


def _page(call: Call, status_code: int = 200, notice: str | None = None, **shown: str) -> Response:
    users, locked = _listing(call)
    return call.render(
        "users.html",
        status_code,
        users=users,
        locked=locked,
        roles=[role.value for role in Role],
        notice=notice,
        error=notice if status_code >= 400 else None,
        shown_once=shown,
    )


def users_page(call: Call) -> Response:
    return _page(call)


def users_api(call: Call) -> Response:
    users, locked = _listing(call)
    return call.json({"id": "users", "url": call.url("/users"), "users": users, "locked_names": locked})


def _answer(call: Call, name: str, notice: str, status_code: int = 200, **shown: str) -> Response:
    if call.identity is not None and call.identity.via_token:
        key = "error" if status_code >= 400 else "done"
        return call.json(
            {"id": name, "url": call.url(f"/users#user-{name}"), key: notice, **shown}, status_code
        )
    return _page(call, status_code, notice, **shown)


def _change(call: Call, change: Callable[[Engine, str], str]) -> Response:
    name = call.request.path_params["name"]
    try:
        notice = change(call.context.engine, name)
    except accounts.UserError as exc:
        return _answer(call, name, str(exc), 400)
    return _answer(call, name, notice)


def add_user(call: Call) -> Response:
    name = call.form.get("name", "").strip()
    given = call.form.get("password", "")
    password = given or new_password()
    try:
        accounts.add_user(
            call.context.engine, name, call.form.get("role", ""), password, actor=actor_of(call)
        )
    except accounts.UserError as exc:
        return _answer(call, name, str(exc), 400)
    if given:
        return _answer(call, name, f"Added user {name}.")
    return _answer(call, name, f"Added user {name}.", password=password)


def disable_user(call: Call) -> Response:
    def change(engine: Engine, name: str) -> str:
        done = accounts.disable_user(engine, name, actor=actor_of(call))
        return f"{name} is disabled." if done else f"{name} was disabled already."

    return _change(call, change)


def enable_user(call: Call) -> Response:
    def change(engine: Engine, name: str) -> str:
        done = accounts.enable_user(engine, name, actor=actor_of(call))
        return f"{name} is enabled." if done else f"{name} was enabled already."

    return _change(call, change)


def remove_user(call: Call) -> Response:
    def change(engine: Engine, name: str) -> str:
        accounts.remove_user(engine, name, actor=actor_of(call))
        return f"Removed user {name}."

    return _change(call, change)


def reset_password(call: Call) -> Response:
    name = call.request.path_params["name"]
    password = new_password()
    try:
        accounts.set_password(call.context.engine, name, password, actor=actor_of(call))
    except accounts.UserError as exc:
        return _answer(call, name, str(exc), 400)
    return _answer(call, name, f"New password of {name} (shown this once):", password=password)


def issue_token(call: Call) -> Response:
    name = call.request.path_params["name"]
    try:
        token = accounts.issue_api_token(call.context.engine, name, actor=actor_of(call))
    except accounts.UserError as exc:
        return _answer(call, name, str(exc), 400)
    return _answer(
        call, name, f"New API token of {name} (shown this once; it replaces the previous one):", token=token
    )


def unlock(call: Call) -> Response:
    def change(engine: Engine, name: str) -> str:
        lifted = lift_lockout(engine, name, actor=actor_of(call))
        return f"Lockout of {name} lifted." if lifted else f"{name} was not locked out."

    return _change(call, change)


ROUTES = [
    ConsoleRoute("/users", users_page, Action.VIEW_USERS, nav="Users"),
    ConsoleRoute("/api/v1/users", users_api, Action.VIEW_USERS),
    ConsoleRoute("/users", add_user, Action.MANAGE_USERS, methods=("POST",)),
    ConsoleRoute("/users/{name}/disable", disable_user, Action.MANAGE_USERS, methods=("POST",)),
    ConsoleRoute("/users/{name}/enable", enable_user, Action.MANAGE_USERS, methods=("POST",)),
    ConsoleRoute("/users/{name}/remove", remove_user, Action.MANAGE_USERS, methods=("POST",)),
    ConsoleRoute("/users/{name}/password", reset_password, Action.MANAGE_USERS, methods=("POST",)),
    ConsoleRoute("/users/{name}/token", issue_token, Action.MANAGE_USERS, methods=("POST",)),
    ConsoleRoute("/users/{name}/unlock", unlock, Action.MANAGE_SIGN_INS, methods=("POST",)),
]
