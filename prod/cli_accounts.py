"""The command line's ``accounts`` commands, and which account another command acts on.

The deployment's accounts are those in the index (``emailops accounts import``) and the one the
``EMAIL_*`` settings define, if any. A command on one account's data takes ``--account NAME``;
with one account it may be left out. Every change is made by ``emailops.accounts.store`` (the
console calls it too) and recorded in the audit log as done by ``cli:<OS user>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prod.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, open_index, print_json
from prod.cli_users import cli_actor
from prod.redaction import REDACTOR
from prod.runtime_settings import RuntimeSettings

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from emailops.accounts.config import AccountConfig
    from emailops.accounts.probe import ProbeResult
    from emailops.auth.crypto import SecretCipher


def secret_cipher(settings: RuntimeSettings) -> SecretCipher | None:
    """The cipher of SECRETS_KEY, None when it is unset."""
    from emailops.auth.crypto import SecretCipher

    keys = settings.secret_keys()
    return SecretCipher(keys) if keys else None


def deployment_accounts(settings: RuntimeSettings, conn: Connection) -> list[AccountConfig]:
    """Every account: the default one (EMAIL_*) first, then the index's by name (their secrets
    left empty: see ``choose_account``)."""
    from emailops.accounts.store import list_accounts

    stored = list_accounts(conn)
    if not settings.has_default_account:
        return stored
    default = settings.default_account()
    if any(account.name == default.name for account in stored):
        raise CommandError(
            f"account {default.name!r} is defined both by the EMAIL_* settings and in the index: "
            "set EMAIL_ACCOUNT_NAME to another name, or remove one of them",
            code=78,
        )
    return [default, *stored]


def choose_account(
    settings: RuntimeSettings, engine: Engine, name: str | None, *, secrets: bool = False
) -> AccountConfig:
    """The account ``--account`` names, or the only one. ``secrets``: its password and OAuth2
    secrets are needed (signing in), which an account of the index has only with SECRETS_KEY."""
    from emailops.accounts.store import get_account, secrets_key_missing
    from emailops.store.database import reading

    cipher = secret_cipher(settings) if secrets else None
    with reading(engine) as conn:
        found = deployment_accounts(settings, conn)
    names = [account.name for account in found]
    if not found:
        raise CommandError(
            "no account: import some with `emailops accounts import FILE.toml`, or set EMAIL_IMAP_HOST, "
            "EMAIL_IMAP_PORT, EMAIL_SMTP_HOST, EMAIL_SMTP_PORT, EMAIL_USERNAME and EMAIL_PASSWORD",
            code=78,
        )
    if name is None:
        if len(found) > 1:
            raise CommandError(f"several accounts ({', '.join(names)}): name one with --account NAME")
        chosen = found[0]
    elif name in names:
        chosen = found[names.index(name)]
    else:
        raise CommandError(f"no account {name!r} (accounts: {', '.join(names)})")
    if not secrets or (settings.has_default_account and chosen.name == names[0]):
        return chosen
    if cipher is None:
        raise CommandError(str(secrets_key_missing(chosen.name)), code=78)
    with reading(engine) as conn:
        account = get_account(conn, chosen.name, cipher)
    assert account is not None
    # Masked in this process's logs and Sentry events, as EMAIL_PASSWORD is.
    for secret in (account.password, *(_oauth2_secrets(account))):
        REDACTOR.register(secret, username=account.username)
    return account


def _oauth2_secrets(account: AccountConfig) -> tuple[str, ...]:
    options = account.oauth2
    return tuple(filter(None, (options.client_secret, options.refresh_token))) if options else ()


def add_account_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--account",
        metavar="NAME",
        help="the account (`emailops accounts list`); needed when there are several",
    )


# -- accounts ----------------------------------------------------------------------------------


def cmd_accounts(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.accounts.fields import AccountError
    from emailops.maintenance import IndexInUseError

    with open_index(settings) as engine:
        try:
            return int(_ACTIONS[args.action](settings, engine, args))
        except AccountError as exc:
            print(f"emailops accounts {args.action}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except IndexInUseError as exc:
            lease = exc.lease
            print(
                f"emailops accounts {args.action}: refused, nothing changed: a running daemon watches folder "
                f"{lease.folder!r} of the account; stop it first",
                file=sys.stderr,
            )
            return EXIT_FAILED


def _import(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    from emailops.accounts.fields import AccountError, accounts_from_file
    from emailops.accounts.store import import_accounts

    path: Path = args.file
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AccountError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AccountError(f"{path}: not valid TOML: {exc}") from None
    try:
        configs = accounts_from_file(data, settings.account_defaults(), os.environ)
        _refuse_default_name(settings, [config.name for config in configs])
        result = import_accounts(engine, configs, secret_cipher(settings), actor=cli_actor())
    except AccountError as exc:
        raise AccountError(f"{path}: {exc}; nothing was imported") from None
    if args.json:
        print_json(asdict(result) | {"changes": result.changes})
        return EXIT_OK
    for what, names in (("added", result.added), ("changed", result.changed)):
        for name in names:
            print(f"{what}: {name}")
    print(
        f"{path}: {len(result.added)} added, {len(result.changed)} changed, "
        f"{len(result.unchanged)} unchanged ({result.changes} change(s))"
    )
    return EXIT_OK


def _refuse_default_name(settings: RuntimeSettings, names: list[str]) -> None:
    from emailops.accounts.fields import AccountError

    if settings.has_default_account and settings.default_account().name in names:
        name = settings.default_account().name
        raise AccountError(
            f"account {name!r}: name: is the account of the EMAIL_* settings (EMAIL_ACCOUNT_NAME)"
        )


def _list(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    from emailops.accounts.status import account_statuses
    from emailops.store.database import reading

    with reading(engine) as conn:
        found = account_statuses(conn, deployment_accounts(settings, conn))
    if args.json:
        print_json([asdict(status) for status in found])
        return EXIT_OK
    for s in found:
        last = s.last_sync.isoformat(timespec="seconds") if s.last_sync else "never"
        print(
            f"{s.name}  {s.username}  {'enabled' if s.enabled else 'disabled'}  {s.state}  "
            f"folders {','.join(s.folders)}  {s.messages} messages  last sync {last}"
        )
        if s.last_error:
            print(f"    last error: {s.last_error}")
    print(f"{len(found)} account(s)", file=sys.stderr)
    return EXIT_OK


def shown_settings(settings: RuntimeSettings, engine: Engine, account: AccountConfig) -> dict[str, Any]:
    """An account's keys as ``accounts show`` prints them (the console shows the same): every
    secret masked, and where the account is defined (``source``)."""
    from emailops.accounts.store import describe, masked_secrets, plain_values
    from emailops.store.database import reading

    if settings.has_default_account and account.name == settings.default_account().name:
        return plain_values(account) | masked_secrets(account) | {"source": "EMAIL_* settings"}
    with reading(engine) as conn:
        return (describe(conn, account.name) or {}) | {"source": "index"}


def _show(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    values = shown_settings(settings, engine, choose_account(settings, engine, args.name))
    if args.json:
        print_json(values)
        return EXIT_OK
    for key, value in values.items():
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key}: {'-' if shown is None else shown}")
    return EXIT_OK


def _add_keys() -> list[str]:
    """The keys ``accounts add`` takes as flags: all but the name (an argument), ``enabled``
    (``--disabled``) and the secrets (from stdin, never on a command line)."""
    from emailops.accounts.fields import KEYS

    secrets = {"password", "oauth2_client_secret", "oauth2_refresh_token"}
    return sorted(KEYS - {"name", "enabled"} - secrets)


def _add(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    from emailops.accounts.fields import AccountError, account_from_values
    from emailops.accounts.store import get_account, import_accounts
    from emailops.store.database import reading

    values: dict[str, Any] = {"name": args.name}
    values |= {key: getattr(args, key) for key in _add_keys() if getattr(args, key) is not None}
    if args.disabled:
        values["enabled"] = False
    if args.password_stdin:
        values["password" if values.get("auth", "password") == "password" else "oauth2_client_secret"] = (
            sys.stdin.readline().rstrip("\r\n")
        )
    config = account_from_values(values, settings.account_defaults(), os.environ)
    _refuse_default_name(settings, [config.name])
    with reading(engine) as conn:
        if get_account(conn, config.name) is not None:
            raise AccountError(
                f"account {config.name!r}: name: exists already (change it with `accounts import`)"
            )
    import_accounts(engine, [config], secret_cipher(settings), actor=cli_actor())
    print(f"added account {config.name} ({config.username} on {config.imap.host})", file=sys.stderr)
    return EXIT_OK


def stored_name(settings: RuntimeSettings, name: str) -> str:
    """``name``, unless it is the EMAIL_* account (``AccountError``: its settings are changed there)."""
    from emailops.accounts.fields import AccountError

    if settings.has_default_account and settings.default_account().name == name:
        raise AccountError(f"account {name!r} is defined by the EMAIL_* settings: change them there")
    return name


def _enable(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    from emailops.accounts.store import set_enabled

    enabled = args.action == "enable"
    done = set_enabled(engine, stored_name(settings, args.name), enabled, actor=cli_actor())
    print(f"{args.name}: {args.action}d" if done else f"{args.name}: already {args.action}d", file=sys.stderr)
    return EXIT_OK


def _remove(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    from emailops.accounts.fields import AccountError
    from emailops.accounts.store import account_data, get_account, remove_account
    from emailops.store.database import reading

    name = stored_name(settings, args.name)
    if not args.yes:
        with reading(engine) as conn:
            account = get_account(conn, name)
            if account is None:
                raise AccountError(f"no account {name!r}")
            counts = account_data(conn, account.index_key)
        what = ", ".join(f"{count} {label}" for label, count in counts.items())
        print(
            f"emailops accounts remove: this deletes account {name} ({account.username} on "
            f"{account.imap.host}) and its rows in the index: {what}; add --yes to do it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    counts = remove_account(engine, name, actor=cli_actor())
    what = ", ".join(f"{count} {label}" for label, count in counts.items())
    print(f"removed account {name}: {what}", file=sys.stderr)
    return EXIT_OK


def try_sign_in(settings: RuntimeSettings, engine: Engine, name: str) -> tuple[AccountConfig, ProbeResult]:
    """Sign in to the account's servers as the daemon would (``accounts test``, the console's
    "Test connection"): the account and what each server answered."""
    from emailops.accounts.probe import probe_account
    from prod.oauth2_tokens import account_token_source

    account = choose_account(settings, engine, name, secrets=True)
    deployment = settings.deployment()
    return account, probe_account(account, deployment, account_token_source(account, deployment, engine))


def _test(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    account, result = try_sign_in(settings, engine, args.name)
    if args.json:
        print_json(asdict(result) | {"ok": result.ok})
        return EXIT_OK if result.ok else EXIT_FAILED
    server = f"{account.imap.host}:{account.imap.port}"
    if result.imap_error:
        print(f"IMAP {server}: sign-in failed: {result.imap_error}")
    else:
        print(f"IMAP {server}: signed in as {account.username}; folders: {', '.join(result.imap_folders)}")
    server = f"{account.smtp.host}:{account.smtp.port}"
    print(f"SMTP {server}: " + (f"sign-in failed: {result.smtp_error}" if result.smtp_error else "signed in"))
    return EXIT_OK if result.ok else EXIT_FAILED


def _rotate_key(settings: RuntimeSettings, engine: Engine, args: argparse.Namespace) -> int:
    from emailops.accounts.store import rotate_secrets, secrets_key_missing

    cipher = secret_cipher(settings)
    if cipher is None:
        raise secrets_key_missing("*")
    rewritten = rotate_secrets(engine, cipher, actor=cli_actor())
    print(f"{rewritten} stored secret(s) encrypted again with the first key of SECRETS_KEY", file=sys.stderr)
    return EXIT_OK


_ACTIONS = {
    "import": _import,
    "list": _list,
    "show": _show,
    "add": _add,
    "disable": _enable,
    "enable": _enable,
    "remove": _remove,
    "test": _test,
    "rotate-key": _rotate_key,
}


def add_commands(commands: Any) -> None:
    """``accounts`` on the parser of ``prod.cli``."""
    accounts = commands.add_parser(
        "accounts", help="the mailboxes of this deployment: import, list, test, ..."
    )
    accounts.set_defaults(handler=cmd_accounts)
    actions = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    importing = actions.add_parser(
        "import", help="add or update the [[accounts]] of a TOML file by name, all or nothing (README)"
    )
    importing.add_argument("file", type=Path, metavar="FILE.toml")
    importing.add_argument("--json", action="store_true", help="print what changed as JSON")
    listing = actions.add_parser(
        "list", help="every account: state, folders, messages, last sync, last error"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    show = actions.add_parser("show", help="an account's settings, secrets masked")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    add = actions.add_parser("add", help="add one account (the keys of the file as flags)")
    add.add_argument("name", metavar="NAME")
    for key in _add_keys():
        add.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar="VALUE")
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password (auth=oauth2: the client secret) from the first line of stdin",
    )
    for action, text in (
        ("disable", "keep the account and its index, but serve it no more"),
        ("enable", "serve the account again"),
    ):
        actions.add_parser(action, help=text).add_argument("name", metavar="NAME")
    remove = actions.add_parser(
        "remove", help="delete an account with its index rows, outbox, model jobs and tokens (asks for --yes)"
    )
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--yes", action="store_true", help="really delete")
    test = actions.add_parser(
        "test", help="sign in to IMAP (listing the folders) and SMTP; exit 1 on failure"
    )
    test.add_argument("name", metavar="NAME")
    test.add_argument("--json", action="store_true", help="print a JSON object")
    actions.add_parser(
        "rotate-key", help="encrypt every stored secret again with the first key of SECRETS_KEY (NEW,OLD)"
    )
