"""The command line's model-reply commands: ``rules test FILE.eml`` and ``llm`` (the job queue)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

from prod.cli_accounts import add_account_option, choose_account
from prod.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    open_index,
    positive_int,
    print_changes,
    print_json,
)
from prod.runtime_settings import RuntimeSettings

JOB_STATES = ["pending", "working", "done", "failed", "cancelled"]


def cmd_rules_test(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.llm.client import ChatClient
    from emailops.replies.trial import try_rules_on_raw
    from emailops.rules import RulesError, load_rules

    rules_path: Path = args.rules or settings.rules_file
    try:
        raw = args.message.read_bytes()
    except OSError as exc:
        print(f"{args.message}: cannot read the message: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        ruleset = load_rules(rules_path)
    except RulesError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    with open_index(settings) as engine:
        account = choose_account(settings, engine, args.account)
        config = account.reply_config(settings.deployment())
        llm = config.llm
        client = ChatClient.for_config(llm) if llm else None
        outcomes = try_rules_on_raw(
            engine,
            raw,
            max_message_bytes=settings.max_message_bytes,
            account=account.index_key,
            folder=args.folder,
            rules=ruleset,
            config=config,
            client=client,
            now=datetime.now(UTC),
        )
    if args.json:
        print_json([outcome_json(o) for o in outcomes])
    else:
        _print_outcomes(outcomes, rules_path)
    return EXIT_FAILED if any(o.verdict == "model failed" for o in outcomes) else EXIT_OK


def outcome_json(outcome: Any) -> dict[str, Any]:
    """A rule test's outcome as JSON (``rules test --json`` and the console's rule test)."""
    call = outcome.model_call
    return {
        "rule": outcome.rule,
        "reply_action": outcome.reply_action,
        "verdict": outcome.verdict,
        "reason": outcome.reason,
        "mailbox_actions": list(outcome.mailbox_actions),
        "reply": outcome.reply.decode("utf-8", "replace") if outcome.reply else None,
        "model_call": None
        if call is None
        else {
            "model": call.model,
            "latency_ms": call.latency_ms,
            "tokens_in": call.tokens_in,
            "tokens_out": call.tokens_out,
            "error": call.error,
        },
    }


def _print_outcomes(outcomes: list[Any], rules_path: Path) -> None:
    if not outcomes:
        print(f"no rule of {rules_path} matches this message")
    for outcome in outcomes:
        kind = f"reply ({outcome.reply_action})" if outcome.reply_action else "no reply"
        print(f"rule {outcome.rule!r}: matches; {kind}")
        verdict = outcome.verdict + (f": {outcome.reason}" if outcome.reason else "")
        print(f"  decision: {verdict}")
        if outcome.mailbox_actions:
            print(f"  mailbox actions: {', '.join(outcome.mailbox_actions)}")
        call = outcome.model_call
        if call is not None:
            tokens = f", {call.tokens_in} tokens in, {call.tokens_out} out" if call.error is None else ""
            print(f"  model {call.model or '(server default)'}: {call.latency_ms} ms{tokens}")
        if outcome.reply:
            where = "draft saved to the Drafts folder" if outcome.reply_action == "draft" else "reply sent"
            print(f"  the {where} would be:")
            print(_readable(outcome.reply))
    print("nothing was sent or saved", file=sys.stderr)


def _readable(raw: bytes) -> str:
    """Headers as they are, then the decoded text of the body (indented)."""
    message = message_from_bytes(raw, policy=policy.default)
    lines = [f"{name}: {value}" for name, value in message.items()]
    body = message.get_body(("plain",))
    lines += ["", *(body.get_content().rstrip().splitlines() if body is not None else [])]
    return "\n".join(("    " + line).rstrip() for line in lines)


def cmd_llm(settings: RuntimeSettings, args: argparse.Namespace) -> int:
    from emailops.llm import jobs

    with open_index(settings) as engine:
        account = choose_account(settings, engine, args.account).index_key
        if args.action in ("retry", "cancel"):
            from emailops.actions.drafts import change_jobs
            from prod.cli_users import cli_actor

            changes = change_jobs(engine, args.ids, args.action, account=account, actor=cli_actor())
            return print_changes(changes, verb=args.action, what="model job")
        with engine.connect() as conn:
            found = jobs.list_jobs(conn, account=account, states=tuple(args.state or ()), limit=args.limit)
    fields = (
        "id",
        "state",
        "rule_name",
        "action",
        "recipient",
        "model",
        "attempts",
        "last_error",
        "outbox_id",
    )
    if args.json:
        print_json(
            [{name: getattr(j, name) for name in fields} | {"created_at": j.created_at} for j in found]
        )
        return EXIT_OK
    for j in found:
        error = f"  ({j.last_error})" if j.last_error else ""
        reply = f"  outbox {j.outbox_id}" if j.outbox_id else ""
        what = f"{j.rule_name} ({j.action}) -> {j.recipient}"
        print(f"{j.id:>6}  {j.state.value:<9} {what}  {j.attempts} tries{reply}{error}")
    print(f"{len(found)} model job(s)", file=sys.stderr)
    return EXIT_OK


def cmd_llm_problem(settings: RuntimeSettings) -> int | None:
    """For check-config: a rule asks a model and none is configured (exit 78), else None."""
    problem = settings.llm_rules_problem()
    if problem:
        print(f"emailops: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    return None


def add_commands(commands: Any, rules_commands: Any) -> None:
    """``rules test`` and ``llm`` on the parser of ``prod.cli``."""
    trial = rules_commands.add_parser(
        "test",
        help="show what the rules would do with a message (.eml), asking the model for real; sends nothing",
    )
    trial.add_argument("message", type=Path, metavar="FILE.eml", help="the message, as raw RFC 5322 bytes")
    trial.add_argument("--rules", type=Path, help="the rules file (default: RULES_FILE)")
    trial.add_argument("--folder", default="INBOX", help="the folder it arrives in (default INBOX)")
    trial.add_argument("--json", action="store_true", help="print a JSON list")
    add_account_option(trial)
    trial.set_defaults(handler=cmd_rules_test)

    llm = commands.add_parser("llm", help="replies a model is writing: list, retry or cancel them")
    llm_commands = llm.add_subparsers(dest="action", metavar="ACTION")
    llm.set_defaults(handler=cmd_llm, action="list", state=None, limit=50, json=False, account=None)
    listing = llm_commands.add_parser("list", help="the newest jobs first (default), failed ones with why")
    listing.add_argument("--state", action="append", choices=JOB_STATES, help="only this state (repeatable)")
    listing.add_argument("--limit", type=positive_int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    add_account_option(listing)
    for action, text in (
        ("retry", "ask the model again: failed jobs back to pending with fresh attempts"),
        ("cancel", "never ask: pending or failed jobs become cancelled"),
    ):
        sub = llm_commands.add_parser(action, help=text)
        sub.add_argument("ids", nargs="+", type=int, metavar="ID", help="job ids from 'emailops llm list'")
        add_account_option(sub)
