"""Rules (viewer reads, operator tests, admin edits): the running rules in order with their last
match and 7-day matches; the editor, whose text is checked (``validate_rules_text``: each error at
its line, nothing saved) and compared with the running file before ``save_rules`` replaces it
(the daemon loads it at its next message); the kept versions, restorable; and a rule set tried on
an indexed message or an uploaded one (``emailops.replies.trial``: nothing sent or recorded).
The matches are counted, and a rule set tried, for the account ``account=`` names."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from emailops.llm.client import ChatClient
from emailops.replies.decision_log import rules_stats
from emailops.replies.trial import try_rules_on_indexed, try_rules_on_raw
from emailops.rules import RulesError, RuleSet, load_rules
from emailops.rules.loader import parse_rules
from emailops.rules.text_check import RulesProblem, validate_rules_text
from emailops.rules.versions import (
    InvalidRulesError,
    diff_against_running,
    list_versions,
    restore_rules,
    running_text,
    save_rules,
)
from emailops.store.database import reading
from emailops.users.permissions import Action
from prod.cli_llm import outcome_json
from prod.console.calls import Call, ConsoleRoute
from prod.console.mailbox import AccountChoice, acting_choice, page_choice
from prod.console.pages.actor import actor_of


def _running(call: Call) -> tuple[RuleSet, str | None]:
    """The rules the daemon runs now, and the file's error (then no rules run from it)."""
    path = call.context.settings.rules_file
    if not path.is_file():
        return RuleSet(), None
    try:
        return load_rules(path), None
    except RulesError as exc:
        return RuleSet(), str(exc)


def _rules(call: Call, choice: AccountChoice) -> tuple[list[dict[str, object]], str | None]:
    ruleset, error = _running(call)
    names = [rule.name for rule in ruleset.rules]
    with reading(call.context.engine) as conn:
        stats = rules_stats(conn, choice.key, names, now=call.context.clock())
    found: list[dict[str, object]] = [
        {
            "id": rule.name,
            "url": call.url(f"/rules?{choice.query()}#rule-{rule.index}"),
            "index": rule.index,
            "name": rule.name,
            "folders": list(rule.folders),
            "reply": rule.reply.action.value if rule.reply is not None else None,
            "matches_7_days": stat.matches,
            "last_match": stat.last_match,
        }
        for rule, stat in zip(ruleset.rules, stats, strict=True)
    ]
    return found, error


def _versions(call: Call) -> list[dict[str, object]]:
    with reading(call.context.engine) as conn:
        kept = list_versions(conn)
    return [
        {
            "id": version.id,
            "url": call.url(f"/rules#version-{version.id}"),
            "sha256": version.sha256,
            "author": version.author,
            "saved_at": version.saved_at,
        }
        for version in kept
    ]


def rules_page(call: Call, status_code: int = 200, **shown: Any) -> Response:
    choice = page_choice(call)
    if isinstance(choice, Response):
        return choice
    rules, error = _rules(call, choice)
    text = shown.pop("text", None)
    return call.render(
        "rules.html",
        status_code,
        choice=choice,
        rules=rules,
        file_error=error,
        versions=_versions(call),
        text=running_text(call.context.settings.rules_file) if text is None else text,
        **shown,
    )


def rules_api(call: Call) -> Response:
    choice = page_choice(call)
    if isinstance(choice, Response):
        return choice
    rules, error = _rules(call, choice)
    return call.json(
        {
            "id": "rules",
            "url": call.url(f"/rules?{choice.query()}"),
            "account": choice.value,
            "rules": rules,
            "error": error,
            "versions": _versions(call),
        }
    )


def _problems(problems: list[RulesProblem]) -> list[dict[str, object]]:
    return [{"line": p.line, "message": p.message} for p in problems]


def check_form(call: Call) -> Response:
    """The text's errors at their lines (422), or the diff it would make to the running file."""
    text = call.form.get("text", "")
    path = call.context.settings.rules_file
    problems = validate_rules_text(text, path=path)
    if problems:
        return rules_page(call, 422, text=text, problems=_problems(problems))
    return rules_page(call, text=text, diff=diff_against_running(path, text), checked=True)


def _save(call: Call) -> tuple[str, int, list[dict[str, object]]]:
    text = call.form.get("text", "")
    try:
        version = save_rules(
            call.context.engine, call.context.settings.rules_file, text, actor=actor_of(call)
        )
    except InvalidRulesError as exc:
        return "Not saved: the rules have errors.", 422, _problems(exc.problems)
    return f"Saved as version {version.id}: the daemon runs it from its next message.", 200, []


def save_form(call: Call) -> Response:
    notice, status, problems = _save(call)
    text = call.form.get("text", "") if problems else None
    return rules_page(call, status, text=text, notice=notice, problems=problems)


def save_api(call: Call) -> Response:
    notice, status, problems = _save(call)
    key = "done" if status == 200 else "error"
    return call.json({"id": "rules", "url": call.url("/rules"), key: notice, "problems": problems}, status)


def _restore(call: Call) -> tuple[int, str, int]:
    version_id = int(call.request.path_params["id"])
    path = call.context.settings.rules_file
    try:
        version = restore_rules(call.context.engine, path, version_id, actor=actor_of(call))
    except LookupError as exc:
        return version_id, f"Not restored: {exc}.", 404
    except InvalidRulesError as exc:
        return version_id, f"Not restored: {exc}.", 422
    return version_id, f"Version {version_id} restored as version {version.id}: running now.", 200


def restore_form(call: Call) -> Response:
    _, notice, status = _restore(call)
    return rules_page(call, status, notice=notice)


def restore_api(call: Call) -> Response:
    version_id, notice, status = _restore(call)
    key = "done" if status == 200 else "error"
    return call.json({"id": version_id, "url": call.url(f"/rules#version-{version_id}"), key: notice}, status)


def _trial(call: Call) -> tuple[int, list[dict[str, Any]] | str] | Response:
    """The outcome of each matching rule on the form's message of the account it names (the
    form's rules text, else the running rules), or why there is none; the 404 answer for an
    unknown account. Nothing is sent or recorded."""
    settings = call.context.settings
    acting = acting_choice(call)
    if isinstance(acting, Response):
        return acting
    raw = call.uploads.get("eml")
    try:
        message_pk = None if raw else int(call.form.get("message", ""))
    except ValueError:
        return 400, "give the id of an indexed message or upload a message (.eml)"
    text = call.form.get("text", "")
    if text:
        problems = validate_rules_text(text, path=settings.rules_file)
        if problems:
            return 422, "; ".join(p.message for p in problems)
        ruleset = parse_rules(tomllib.loads(text), path=settings.rules_file)
    else:
        ruleset, error = _running(call)
        if error is not None:
            return 422, error
    config = settings.reply_config()
    trial: dict[str, Any] = {
        "account": acting.key,
        "rules": ruleset,
        "config": config,
        "client": ChatClient.for_config(config.llm) if config.llm else None,
        "now": datetime.now(UTC),
    }
    if message_pk is None:
        assert raw is not None
        folder = call.form.get("folder") or "INBOX"
        max_bytes = settings.max_message_bytes
        return 200, [
            outcome_json(o)
            for o in try_rules_on_raw(
                call.context.engine, raw, max_message_bytes=max_bytes, folder=folder, **trial
            )
        ]
    outcomes = try_rules_on_indexed(call.context.engine, message_pk, **trial)
    if outcomes is None:
        return 404, f"no indexed message {message_pk} of {acting.value}"
    return 200, [outcome_json(outcome) for outcome in outcomes]


def trial_form(call: Call) -> Response:
    tried = _trial(call)
    if isinstance(tried, Response):
        return tried
    status, found = tried
    if isinstance(found, str):
        return rules_page(call, status, notice=f"Not tried: {found}.")
    return rules_page(call, trial=found, trial_message=call.form.get("message") or "uploaded")


def trial_api(call: Call) -> Response:
    tried = _trial(call)
    if isinstance(tried, Response):
        return tried
    status, found = tried
    key = "outcomes" if isinstance(found, list) else "error"
    return call.json({"id": "rules-test", "url": call.url("/rules#test"), key: found}, status)


ROUTES = [
    ConsoleRoute("/rules", rules_page, Action.VIEW_RULES, nav="Rules"),
    ConsoleRoute("/api/v1/rules", rules_api, Action.VIEW_RULES),
    ConsoleRoute("/rules/check", check_form, Action.EDIT_RULES, methods=("POST",)),
    ConsoleRoute("/rules/save", save_form, Action.EDIT_RULES, methods=("POST",)),
    ConsoleRoute("/api/v1/rules/save", save_api, Action.EDIT_RULES, methods=("POST",)),
    ConsoleRoute("/rules/versions/{id:int}/restore", restore_form, Action.EDIT_RULES, methods=("POST",)),
    ConsoleRoute(
        "/api/v1/rules/versions/{id:int}/restore", restore_api, Action.EDIT_RULES, methods=("POST",)
    ),
    ConsoleRoute("/rules/test", trial_form, Action.TEST_RULES, methods=("POST",)),
    ConsoleRoute("/api/v1/rules/test", trial_api, Action.TEST_RULES, methods=("POST",)),
]
