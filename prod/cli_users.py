"""The command line's ``users`` and ``audit`` commands (the operator console's people, issue 23).

Every change is made by the function of ``emailops.users.accounts`` the console calls too, and
recorded in the audit log as done by ``cli:<OS user>`` with the role admin (whoever can run the
command line can change the database anyway). This module does not import ``prod.cli``: that
module registers these commands and hands over what they share with it (``add_commands``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from emailops.users.permissions import Role
from prod.cli_common import EXIT_FAILED, EXIT_OK, open_index, positive_int, print_json
from prod.runtime_settings import RuntimeSettings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from emailops.audit import Actor
    from emailops.users.accounts import User

EXIT_USAGE = 2


def cli_actor() -> Actor:
    """The person at the command line, by their OS user name (their uid when it has none)."""
    from emailops.audit import Actor

    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        who = f"uid {os.getuid()}"
    return Actor(name=f"cli:{who}", role=Role.ADMIN.value)


def _read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """The password from stdin (its first line) with --password-stdin, else a generated one;
    and whether it was generated (then it is printed, once)."""
    from emailops.users.credentials import new_password

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n"), False
    return new_password(), True


def cmd_users(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.users import accounts

    with open_index(settings) as engine:
        if args.action == "list":
            with engine.connect() as conn:
                found = accounts.list_users(conn)
            return _print_users(found, args.json)
        try:
            return _change_user(engine, args)
        except accounts.UserError as exc:
            print(f"emailops users {args.action}: {exc}", file=sys.stderr)
            return EXIT_FAILED


def _change_user(engine: Engine, args: argparse.Namespace) -> int:
    from emailops.users import accounts

    actor = cli_actor()
    name: str = args.name
    if args.action == "add":
        password, generated = _read_password(args)
        accounts.add_user(engine, name, args.role, password, actor=actor)
        print(f"added user {name} ({args.role})", file=sys.stderr)
        if generated:
            print(password)
            print("the password is shown this once; it is stored as an Argon2id hash", file=sys.stderr)
    elif args.action == "passwd":
        password, generated = _read_password(args)
        accounts.set_password(engine, name, password, actor=actor)
        print(f"password of {name} changed", file=sys.stderr)
        if generated:
            print(password)
    elif args.action in ("disable", "enable"):
        change = accounts.disable_user if args.action == "disable" else accounts.enable_user
        done = change(engine, name, actor=actor)
        print(f"{name}: {args.action}d" if done else f"{name}: already {args.action}d", file=sys.stderr)
    elif args.action == "unlock":
        from emailops.users.sign_in_throttle import lift_lockout

        lifted = lift_lockout(engine, name, actor=actor)
        print(f"{name}: lockout lifted" if lifted else f"{name}: not locked out", file=sys.stderr)
    elif args.action == "remove":
        if not args.yes:
            print(
                f"emailops users remove: this deletes user {name} and their API token; "
                "add --yes to do it (the audit log keeps what they did)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        accounts.remove_user(engine, name, actor=actor)
        print(f"removed user {name}", file=sys.stderr)
    else:
        token = accounts.issue_api_token(engine, name, actor=actor)
        print(token)
        print(
            f"API token of {name}: shown this once (only its SHA-256 is stored); "
            "it replaces any previous token. Send it as 'Authorization: Bearer <token>'",
            file=sys.stderr,
        )
    return EXIT_OK


def _print_users(found: list[User], as_json: bool) -> int:
    if as_json:
        print_json([asdict(u) for u in found])  # a User holds no hash by design
        return EXIT_OK
    for u in found:
        state = "disabled" if u.disabled else "enabled"
        token = (
            f"API token since {u.token_created_at:%Y-%m-%d %H:%M}" if u.token_created_at else "no API token"
        )
        print(f"{u.name}  {u.role.value:<8} {state:<8} {token}")
    print(f"{len(found)} user(s)", file=sys.stderr)
    return EXIT_OK


_DURATION = re.compile(r"(\d+)([mhd])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def since_moment(text: str, now: datetime | None = None) -> datetime:
    """An argparse type: an ISO 8601 date or time (UTC unless it names an offset), or a span back
    from now such as ``30m``, ``24h``, ``7d``."""
    span = _DURATION.fullmatch(text.strip())
    if span:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[span[2]]: int(span[1])})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 date or time (2026-05-01, 2026-05-01T09:00) or 30m, 24h, 7d; got {text!r}"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def cmd_audit(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.audit import list_entries
    from emailops.store.database import reading

    with open_index(settings) as engine, reading(engine) as conn:
        entries = list_entries(
            conn, since=args.since, actions=args.action or (), actor=args.user, limit=args.limit
        )
    if args.json:
        print_json([asdict(e) for e in entries])
        return EXIT_OK
    for e in entries:
        change = "".join(
            f"  {label}={json.dumps(value, ensure_ascii=False)}"
            for label, value in (("before", e.before), ("after", e.after))
            if value is not None
        )
        where = f" from {e.source}" if e.source else ""
        print(
            f"{e.at:%Y-%m-%d %H:%M:%S}Z  {e.actor} ({e.role}){where}  {e.action}  {e.target or '-'}{change}"
        )
    print(f"{len(entries)} audit entr{'y' if len(entries) == 1 else 'ies'}", file=sys.stderr)
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """``users`` and ``audit`` on the parser of ``prod.cli``."""
    roles = [role.value for role in Role]
    users = commands.add_parser("users", help="people who sign in to the operator console: add, list, ...")
    users.set_defaults(handler=cmd_users)
    users_commands = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = users_commands.add_parser("list", help="every user with role, state and API token date")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    for action, text in (
        ("add", "add a user; prints a generated password unless --password-stdin"),
        ("passwd", "set a new password; prints a generated one unless --password-stdin"),
    ):
        sub = users_commands.add_parser(action, help=text)
        sub.add_argument("name", metavar="NAME")
        if action == "add":
            sub.add_argument("--role", required=True, choices=roles, help="what the user may do (README)")
        sub.add_argument(
            "--password-stdin", action="store_true", help="read the password from the first line of stdin"
        )
    for action, text in (
        ("disable", "refuse the user's password and API token (kept for enable)"),
        ("enable", "accept the user's password and API token again"),
        ("token", "issue an API token (shown once; replaces the previous one)"),
        ("unlock", "lift the console's sign-in lockout of a user name (after too many failures)"),
    ):
        users_commands.add_parser(action, help=text).add_argument("name", metavar="NAME")
    remove = users_commands.add_parser("remove", help="delete a user and their API token (asks for --yes)")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--yes", action="store_true", help="really delete")

    audit = commands.add_parser("audit", help="the audit log: who changed what, newest first")
    audit.add_argument("--json", action="store_true", help="print a JSON list")
    audit.add_argument(
        "--since", type=since_moment, help="from this time: ISO 8601 (UTC unless an offset), or 30m, 24h, 7d"
    )
    audit.add_argument("--action", action="append", help="only this action, e.g. user.add (repeatable)")
    audit.add_argument("--user", help="only what this user (or cli:NAME) did")
    audit.add_argument("--limit", type=positive_int, default=100, help="at most this many (default 100)")
    audit.set_defaults(handler=cmd_audit)
