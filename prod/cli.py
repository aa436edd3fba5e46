"""The ``emailops`` command line (also ``python -m emailops``).

This is an entry point like ``prod.run``: it reads and validates the settings, configures logging
(JSON on stderr, so stdout carries only the command's answer), then calls the domain library with
plain values. Exit codes: 0 done, 1 failed, 2 usage error, 78 invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prod.cli_accounts import add_account_option, choose_account
from prod.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    json_default,
    open_index,
    positive_int,
    print_changes,
    print_json,
)
from prod.runtime_settings import ConfigError, RuntimeSettings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from emailops.accounts.config import AccountConfig
    from emailops.config import ServerConfig
    from emailops.maintenance import IndexInUseError
    from emailops.replies.move_folders import MoveFolder
    from emailops.rules.model import RuleSet


def _imap(settings: RuntimeSettings, engine: Engine, account: AccountConfig) -> ServerConfig:
    from prod.oauth2_tokens import account_token_source

    deployment = settings.deployment()
    return account.imap_config(deployment, account_token_source(account, deployment, engine))


# -- commands ----------------------------------------------------------------------------------


def cmd_sync(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.maintenance import sync_once

    if not args.once:
        print("emailops sync runs once with --once; the daemon is `python -m prod.run`", file=sys.stderr)
        return 2
    with open_index(settings) as engine:
        account = choose_account(settings, engine, args.account, secrets=True)
        reports = sync_once(
            engine, _imap(settings, engine, account), account.sync_config(settings.deployment())
        )
    return _print_reports(reports, args.json)


def _print_reports(reports: Sequence[Any], as_json: bool) -> int:
    """The reports, one line per folder; exit 1 when a configured folder is not on the server."""
    code = EXIT_FAILED if any(r.missing for r in reports) else EXIT_OK
    if as_json:
        print_json([{k: v for k, v in asdict(r).items() if k != "new_message_pks"} for r in reports])
        return code
    for r in reports:
        if r.missing:
            print(f"{r.folder}: does not exist on the server (check EMAIL_FOLDERS)")
            continue
        print(
            f"{r.folder}: {r.new} new, {r.flags_changed} flag changes, {r.expunged} expunged"
            f"{', resynced after UIDVALIDITY change' if r.resynced else ''} in {r.seconds:.2f} s"
        )
    synced = [r for r in reports if not r.missing]
    print(f"total: {sum(r.new for r in synced)} new messages indexed in {len(synced)} folder(s)")
    return code


def cmd_search(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo

    from emailops.search.query import And, Folder, QueryError, parse
    from emailops.search.service import SearchOptions, Sort, count, message_keys, search, threads
    from emailops.store.database import reading
    from emailops.store.folders import get_folder
    from emailops.store.messages import folder_stats

    try:
        node = parse(" ".join(args.query))
    except QueryError as error:
        print(f"emailops search: {error}", file=sys.stderr)
        return 2
    output = "json" if args.json else args.output
    with open_index(settings) as engine, reading(engine) as conn:
        chosen = choose_account(settings, engine, args.account)
        account = chosen.index_key
        options = SearchOptions(
            sort=Sort(args.sort),
            limit=args.limit,
            offset=args.offset,
            timezone=ZoneInfo(settings.search_timezone),
            account_names=frozenset({chosen.username, account}),
        )
        if args.folder is not None:
            if get_folder(conn, account, args.folder) is None:
                # A mistyped folder would otherwise look like a search that found nothing.
                known = ", ".join(f.name for f in folder_stats(conn, account)) or "none yet"
                message = f"no folder {args.folder!r} in the index (indexed: {known})"
                print(f"emailops search: {message}", file=sys.stderr)
                return 2
            node = And((node, Folder(args.folder)))
        if args.count:
            print(count(conn, account, node, options))
            return EXIT_OK
        if output == "ids":
            keys = message_keys(conn, account, node, options)
            for folder, uidvalidity, uid in keys:
                print(f"{folder} {uidvalidity} {uid}")
            print(f"{len(keys)} message(s)", file=sys.stderr)
            return EXIT_OK
        if output == "threads":
            found = threads(conn, account, node, options)
            for t in found:
                date = t.newest.strftime("%Y-%m-%d %H:%M") if t.newest else "-"
                print(f"{date}  {t.messages:>4}  {t.subject}  thread:{t.thread_key}")
            print(f"{len(found)} thread(s)", file=sys.stderr)
            return EXIT_OK
        hits = search(conn, account, node, options)
    if output == "json":
        print_json(
            [
                {
                    "folder": h.folder,
                    "uidvalidity": h.uidvalidity,
                    "uid": h.uid,
                    "message_id": h.message_id,
                    "thread": h.thread_key,
                    "from": h.sender,
                    "subject": h.subject,
                    "date": h.date,
                    "snippet": h.snippet.text,
                    "marks": [list(mark) for mark in h.snippet.marks],
                }
                for h in hits
            ]
        )
        return EXIT_OK
    for h in hits:
        date = h.date.strftime("%Y-%m-%d %H:%M") if h.date else "-"
        print(f"{h.folder}:{h.uid}  {date}  {h.sender}  {h.subject}\n    {h.snippet.marked()}")
    print(f"{len(hits)} message(s)", file=sys.stderr)
    return EXIT_OK


def cmd_stats(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.store.database import reading
    from emailops.store.messages import folder_stats

    with open_index(settings) as engine, reading(engine) as conn:
        stats = folder_stats(conn, choose_account(settings, engine, args.account).index_key)
    result = {
        "messages_total": sum(s.messages for s in stats),
        "folders": [
            {
                "name": s.name,
                "uidvalidity": s.uidvalidity,
                "messages": s.messages,
                "expunged": s.expunged,
                "last_sync": s.last_sync,
            }
            for s in stats
        ],
    }
    if args.json:
        print_json(result)
        return EXIT_OK
    for s in stats:
        last = s.last_sync.isoformat(timespec="seconds") if s.last_sync else "never"
        print(f"{s.name}: {s.messages} messages ({s.expunged} expunged), last sync {last}")
    print(f"total: {result['messages_total']} messages")
    return EXIT_OK


def cmd_quarantine(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.store import index_work, rules_work
    from emailops.store.database import reading

    with open_index(settings) as engine, reading(engine) as conn:
        account = choose_account(settings, engine, args.account).index_key
        entries = [{"stage": "index", **asdict(e)} for e in index_work.list_quarantined(conn, account)] + [
            {"stage": "rules", **asdict(e)} for e in rules_work.list_quarantined(conn, account)
        ]
    if args.json:
        print_json(entries)
        return EXIT_OK
    for e in entries:
        where = f"{e['folder']}:{e['uid']}  {e['message_id'] or '(no Message-ID)'}"
        print(f"{where}  {e['stage']}, {e['attempts']} attempts: {e['reason']}")
    print(f"{len(entries)} quarantined message(s)", file=sys.stderr)
    return EXIT_OK


def cmd_reindex(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.maintenance import IndexInUseError, reindex

    with open_index(settings) as engine:
        account = choose_account(settings, engine, args.account, secrets=True)
        try:
            reports = reindex(
                engine, _imap(settings, engine, account), account.sync_config(settings.deployment())
            )
        except IndexInUseError as exc:
            print(f"emailops reindex: refused, nothing changed: {_lease_holder(exc)}", file=sys.stderr)
            return EXIT_FAILED
    return _print_reports(reports, args.json)


def _lease_holder(exc: IndexInUseError) -> str:
    """Which process holds the index and how to stop it, in one line."""
    import socket

    from emailops.processes import ProcessIdentity

    lease = exc.lease
    holder = ProcessIdentity.parse(lease.owner)
    who = f"worker {holder.worker} (pid {holder.pid} on host {holder.host})" if holder else lease.owner
    supervisor = _parent_pid(holder.pid) if holder and holder.host == socket.gethostname() else None
    stop = f"`kill -TERM {supervisor}` (its supervisor)" if supervisor else "SIGTERM to its supervisor"
    return (
        f"a running daemon holds the index: {who} watches folder {lease.folder!r} "
        f"(lease until {lease.expires_at:%H:%M:%S} UTC); stop the daemon first (`docker compose stop app`, "
        f"or {stop}), then run reindex again"
    )


def _parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` on this host (Linux /proc), None when it cannot be read."""
    try:
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it.
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cmd_backup(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.maintenance import BackupError, backup_sqlite

    try:
        size = backup_sqlite(settings.index_db_url, args.path)
    except BackupError as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print_json({"path": str(args.path.resolve()), "bytes": size, "integrity": "ok"})
    else:
        print(f"backup written to {args.path} ({size} bytes, integrity ok)")
    return EXIT_OK


def cmd_check_config(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from prod.cli_llm import cmd_llm_problem

    problem = cmd_llm_problem(settings)
    if problem is not None:
        return problem
    values = settings.masked()
    if args.json:
        print_json(values)
    else:
        for name, value in values.items():
            print(f"{name}={value if not isinstance(value, list) else ','.join(map(str, value))}")
        print("configuration ok", file=sys.stderr)
    return EXIT_OK


def cmd_migrate(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.store.database import create_index_engine
    from emailops.store.migrations import current_version, migrate

    engine = create_index_engine(settings.index_db_url)
    try:
        applied = migrate(engine)
        with engine.connect() as conn:
            version = current_version(conn)
    finally:
        engine.dispose()
    if args.json:
        print_json({"applied": [{"version": m.version, "name": m.name} for m in applied], "version": version})
        return EXIT_OK
    for migration in applied:
        print(f"applied {migration.version}: {migration.name}")
    print(f"schema at version {version}")
    return EXIT_OK


def cmd_rules_check(settings: RuntimeSettings | None, args: argparse.Namespace) -> int:
    from emailops.rules import RulesError, load_rules

    path: Path | None = args.file or (settings.rules_file if settings else None)
    if path is None:
        print("emailops rules check: name a FILE or set RULES_FILE", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"{path}: no rules file (the daemon then indexes only and sends no reply)", file=sys.stderr)
        return EXIT_FAILED
    try:
        ruleset = load_rules(path)
    except RulesError as exc:
        from emailops.rules.text_check import error_line

        line = error_line(path.read_text(encoding="utf-8", errors="replace"), exc)
        print(f"{exc} (line {line})" if line else str(exc), file=sys.stderr)
        return EXIT_FAILED
    if settings is not None and _unknown_rule_accounts(settings, ruleset, path):
        return EXIT_FAILED
    missing: list[MoveFolder] = []
    if args.server:
        if settings is None:
            print(
                "emailops rules check --server: the account's settings (EMAIL_*) are needed", file=sys.stderr
            )
            return EXIT_CONFIG
        missing = _missing_move_folders(settings, ruleset, args.account)
    failing = [target for target in missing if not target.create]
    code = EXIT_FAILED if failing else EXIT_OK
    if args.json:
        answer: dict[str, Any] = {"file": str(path), "rules": [rule.name for rule in ruleset.rules]}
        if args.server:
            answer["missing_folders"] = [asdict(target) for target in missing]
        print_json(answer)
        return code
    for rule in ruleset.rules:
        print(f"ok: {rule.name}")
    for target in missing:
        rules = ", ".join(f'"{name}"' for name in target.rules)
        what = "the daemon creates it (create = true)" if target.create else "those moves would fail"
        print(
            f'missing folder "{target.folder}": the server does not have it; moved to by rule {rules}; {what}'
        )
    print(
        f"{path}: {len(ruleset)} rule(s) valid"
        + (f", {len(failing)} move folder(s) missing" if failing else "")
    )
    return code


def _unknown_rule_accounts(settings: RuntimeSettings, ruleset: RuleSet, path: Path) -> bool:
    """Print each name of a rule's match.accounts that is no account; True when there is one."""
    from emailops.rules.matching import unknown_accounts
    from emailops.store.database import reading
    from prod.cli_accounts import deployment_accounts

    if not any(rule.accounts for rule in ruleset.rules):
        return False
    with open_index(settings) as engine, reading(engine) as conn:
        names = [account.name for account in deployment_accounts(settings, conn)]
    unknown = unknown_accounts(ruleset, names)
    for rule, name in unknown:
        print(
            f'{path}: rule "{rule.name}" (#{rule.index}): match.accounts: {name!r} is no account '
            f"(accounts: {', '.join(names) or 'none'})",
            file=sys.stderr,
        )
    return bool(unknown)


def _missing_move_folders(settings: RuntimeSettings, ruleset: RuleSet, name: str | None) -> list[MoveFolder]:
    """The rules' move folders the account's IMAP server does not list (signs in, one LIST)."""
    from emailops.imap.connection import connect, logout_quietly
    from emailops.replies.move_folders import missing_move_folders

    with open_index(settings) as engine:
        account = choose_account(settings, engine, name, secrets=True)
        client = connect(_imap(settings, engine, account))
        try:
            return missing_move_folders(client, ruleset)
        finally:
            logout_quietly(client)


def _change_replies(engine: Engine, args: argparse.Namespace, account: str) -> int:
    from datetime import UTC

    from emailops.actions.replies import Resolution, resolve_replies
    from prod.cli_users import cli_actor

    resolution = {"retry": Resolution.RESEND, "cancel": Resolution.CANCEL}.get(args.action) or args.resolution
    changes = resolve_replies(
        engine, args.ids, Resolution(resolution), account=account, actor=cli_actor(), now=datetime.now(UTC)
    )
    return print_changes(changes, verb=args.action, what="reply")


def cmd_outbox(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.replies import outbox

    with open_index(settings) as engine:
        account = choose_account(settings, engine, args.account).index_key
        if args.action in ("retry", "cancel", "resolve"):
            return _change_replies(engine, args, account)
        states = tuple(args.state) if args.state else None
        with engine.connect() as conn:
            replies = outbox.list_replies(conn, states=states, account=account, limit=args.limit)
    fields = (
        "id",
        "state",
        "rule_name",
        "recipient",
        "subject",
        "attempts",
        "last_error",
        "created_at",
        "sent_at",
    )
    if args.json:
        print_json([{name: getattr(r, name) for name in fields} for r in replies])
        return EXIT_OK
    for r in replies:
        error = f"  ({r.last_error})" if r.last_error else ""
        print(f"{r.id:>6}  {r.state.value:<9} {r.rule_name}  -> {r.recipient}  {r.subject!r}{error}")
    print(f"{len(replies)} repl{'y' if len(replies) == 1 else 'ies'}", file=sys.stderr)
    return EXIT_OK


def cmd_auth(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.auth.errors import OAuth2Error
    from prod.oauth2_tokens import account_token_source

    with open_index(settings) as engine:
        account = choose_account(settings, engine, args.account, secrets=True)
        source: Any = account_token_source(account, settings.deployment(), engine)
        if source is None:
            print(
                f"emailops auth: account {account.name} signs in with a password; set EMAIL_AUTH=oauth2 "
                '(or auth = "oauth2" in its [[accounts]] table) to sign in with OAuth2',
                file=sys.stderr,
            )
            return EXIT_CONFIG
        try:
            if args.auth_command == "login":
                return _auth_login(source, args)
            if args.auth_command == "logout":
                forgotten = source.logout()
                _report(
                    args,
                    {"account": source.config.account, "signed_out": True},
                    [
                        f"{source.config.account}: stored OAuth2 tokens removed"
                        if forgotten
                        else f"{source.config.account}: no OAuth2 tokens were stored"
                    ],
                )
                return EXIT_OK
            return _auth_status(settings, source, args)
        except OAuth2Error as exc:
            print(f"emailops auth {args.auth_command}: {exc}", file=sys.stderr)
            return EXIT_FAILED


def _auth_login(source: Any, args: argparse.Namespace) -> int:
    from emailops.auth.device_login import device_login
    from emailops.auth.token_endpoint import DeviceAuthorization
    from emailops.config import OAuth2Flow

    config = source.config
    if config.flow is OAuth2Flow.CLIENT_CREDENTIALS:
        # App-only access has nobody to sign in: getting a token proves the registration works.
        source.access_token()
    else:

        def show(authorization: DeviceAuthorization) -> None:
            if args.json:
                print(
                    json.dumps(
                        {
                            "verification_uri": authorization.verification_uri,
                            "user_code": authorization.user_code,
                            "expires_in": authorization.expires_in,
                        }
                    ),
                    flush=True,
                )
            else:
                print(
                    f"To sign in {config.username}, open {authorization.verification_uri} and enter the code "
                    f"{authorization.user_code} (valid {authorization.expires_in // 60} minutes). Waiting...",
                    flush=True,
                )

        device_login(source, show=show)
    status = source.status()
    expires = status.access_expires_at if status else None
    _report(
        args,
        {
            "account": config.account,
            "flow": config.flow.value,
            "signed_in": True,
            "access_expires_at": expires,
        },
        [f"{config.account}: signed in ({config.flow.value}); tokens stored, encrypted, in the index"],
    )
    return EXIT_OK


def _auth_status(settings: RuntimeSettings, source: Any, args: argparse.Namespace) -> int:
    config = source.config
    status = source.status()
    result: dict[str, Any] = {
        "account": config.account,
        "provider": config.provider,
        "flow": config.flow.value,
        "signed_in": bool(status and status.signed_in),
        "access_expires_at": status.access_expires_at if status else None,
        "last_refresh": status.refreshed_at if status else None,
        "failures": status.failures if status else 0,
        "next_token_request_after": status.next_attempt_at if status else None,
        "last_error": status.last_error if status else None,
        "last_error_at": status.last_error_at if status else None,
    }
    lines = [f"{name}: {'-' if value is None else value}" for name, value in result.items()]
    _report(args, result, lines)
    return EXIT_OK if result["signed_in"] else EXIT_FAILED


def _report(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(result, default=json_default, ensure_ascii=False), flush=True)
        return
    for line in lines:
        print(line)


def cmd_auth_new_key(settings: RuntimeSettings | None, args: argparse.Namespace) -> int:
    from emailops.auth.crypto import new_key

    print(new_key())
    return EXIT_OK


Command = Callable[[RuntimeSettings, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailops",
        description="EmailOps: index, search and answer one mailbox. Settings come from the "
        "environment and .env (see .env.example).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync = commands.add_parser("sync", help="catch up on every folder once and print a summary")
    sync.add_argument("--once", action="store_true", help="run one catch-up pass and exit (required)")
    sync.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_account_option(sync)
    sync.set_defaults(handler=cmd_sync)

    from emailops.search.query import HELP as SEARCH_HELP

    search = commands.add_parser(
        "search",
        help="search the index: words, phrases, from:, subject:, date:, is:unread, thread:, ...",
        epilog=SEARCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("query", nargs="+", help="the query (quote it for the shell)")
    search.add_argument("--folder", help="only this folder (as folder:NAME)")
    search.add_argument(
        "--sort",
        choices=["newest", "oldest", "relevance"],
        default="newest",
        help="order of the results (default newest first)",
    )
    search.add_argument(
        "--limit", type=positive_int, default=50, help="at most this many results (default 50)"
    )
    search.add_argument("--offset", type=_count, default=0, help="skip this many results first")
    search.add_argument("--count", action="store_true", help="print only how many messages match")
    search.add_argument(
        "--output",
        choices=["summary", "json", "ids", "threads"],
        default="summary",
        help="summary (default); json; ids: FOLDER UIDVALIDITY UID per line; threads: one line per thread",
    )
    search.add_argument("--json", action="store_true", help="the same as --output json")
    add_account_option(search)
    search.set_defaults(handler=cmd_search)

    stats = commands.add_parser("stats", help="messages per folder and when each was last synced")
    stats.add_argument("--json", action="store_true", help="print a JSON object")
    add_account_option(stats)
    stats.set_defaults(handler=cmd_stats)

    quarantine = commands.add_parser(
        "quarantine",
        help="messages set aside because indexing or their rules kept failing (never answered)",
    )
    quarantine.add_argument("--json", action="store_true", help="print a JSON list")
    add_account_option(quarantine)
    quarantine.set_defaults(handler=cmd_quarantine)

    reindex = commands.add_parser("reindex", help="rebuild the index from IMAP (old mail is never answered)")
    reindex.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_account_option(reindex)
    reindex.set_defaults(handler=cmd_reindex)

    backup = commands.add_parser("backup", help="a consistent copy of the SQLite index, safe while running")
    backup.add_argument("path", type=Path, help="where to write the copy")
    backup.add_argument("--json", action="store_true", help="print the copy's path and size as JSON")
    backup.set_defaults(handler=cmd_backup)

    check = commands.add_parser("check-config", help="validate the settings and print them, secrets masked")
    check.add_argument("--json", action="store_true", help="print a JSON object")
    check.set_defaults(handler=cmd_check_config)

    migrate = commands.add_parser("migrate", help="apply pending schema migrations (also done at start)")
    migrate.add_argument("--json", action="store_true", help="print what was applied and the version as JSON")
    migrate.set_defaults(handler=cmd_migrate)

    rules = commands.add_parser("rules", help="work with the rules file")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    rules_check = rules_commands.add_parser(
        "check", help="validate a rules file (default RULES_FILE); errors name the rule and field"
    )
    rules_check.add_argument("file", nargs="?", type=Path, help="the rules file (default: RULES_FILE)")
    rules_check.add_argument("--json", action="store_true", help="print the valid rules' names as JSON")
    rules_check.add_argument(
        "--server",
        action="store_true",
        help="also sign in to the IMAP server and list the folders rules move mail to that it does not "
        "have (exit 1 unless the rule says create = true)",
    )
    add_account_option(rules_check)
    rules_check.set_defaults(handler=cmd_rules_check, settings_optional=True)

    from prod.cli_llm import add_commands

    add_commands(commands, rules_commands)

    box = commands.add_parser("outbox", help="list, retry or cancel automatic replies")
    box_commands = box.add_subparsers(dest="action", metavar="ACTION")
    box.set_defaults(handler=cmd_outbox, action="list", state=None, limit=50, json=False, account=None)
    box_list = box_commands.add_parser("list", help="the newest replies first (default)")
    box_list.add_argument(
        "--state",
        action="append",
        choices=["pending", "sending", "sent", "failed", "unknown", "cancelled"],
        help="only replies in this state (repeatable)",
    )
    box_list.add_argument("--limit", type=positive_int, default=50, help="at most this many (default 50)")
    box_list.add_argument("--json", action="store_true", help="print a JSON list")
    add_account_option(box_list)
    for action, text in (
        (
            "retry",
            "send again: failed or unknown replies back to pending (check 'unknown' ones were not delivered)",
        ),
        ("cancel", "never send: pending, failed or unknown replies become cancelled"),
    ):
        sub = box_commands.add_parser(action, help=text)
        sub.add_argument(
            "ids", nargs="+", type=int, metavar="ID", help="reply ids from 'emailops outbox list'"
        )
        add_account_option(sub)
    resolve = box_commands.add_parser(
        "resolve", help="resolve replies as sent (an unknown one was delivered), resend or cancel"
    )
    resolve.add_argument(
        "--as", dest="resolution", required=True, choices=["sent", "resend", "cancel"], help="the resolution"
    )
    resolve.add_argument(
        "ids", nargs="+", type=int, metavar="ID", help="reply ids from 'emailops outbox list'"
    )
    add_account_option(resolve)

    auth = commands.add_parser("auth", help="OAuth2 sign-in (EMAIL_AUTH=oauth2): login, status, logout")
    auth_commands = auth.add_subparsers(dest="auth_command", required=True, metavar="SUBCOMMAND")
    for name, text in (
        (
            "login",
            "sign in: prints a URL and a code to enter there, waits, stores the tokens "
            "(client_credentials: checks that a token can be had)",
        ),
        ("status", "flow, provider, account, access-token expiry, last refresh, last error (never a token)"),
        ("logout", "remove the stored tokens of the account"),
    ):
        sub = auth_commands.add_parser(name, help=text)
        sub.add_argument("--json", action="store_true", help="print JSON (login: one line per step)")
        add_account_option(sub)
        sub.set_defaults(handler=cmd_auth)
    new_key = auth_commands.add_parser(
        "new-key", help="print a new random key for EMAIL_OAUTH2_TOKEN_KEY (the tokens' encryption key)"
    )
    new_key.set_defaults(handler=cmd_auth_new_key, settings_optional=True)

    from prod.cli_users import add_commands as add_user_commands

    add_user_commands(commands)

    from prod.cli_accounts import add_commands as add_account_commands

    add_account_commands(commands)
    return parser


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    from prod.logging_setup import configure_logging

    args = build_parser().parse_args(argv)
    try:
        settings = RuntimeSettings.from_env()
    except ConfigError as exc:
        configure_logging(None, process_role="cli")
        if getattr(args, "settings_optional", False):
            return int(args.handler(None, args))
        print(f"emailops: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings, process_role="cli")
    handler: Command = args.handler
    try:
        return handler(settings, args)
    except CommandError as exc:
        print(f"emailops {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"emailops: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one readable line for the operator; the traceback goes to the log
        import structlog

        structlog.get_logger(component="cli").exception("command failed", command=args.command)
        print(f"emailops {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
