"""Load and validate the rules file (TOML); see ``examples/rules.toml`` for every key.

``load_rules(path)`` returns a ``RuleSet`` or raises ``RulesError`` whose message names the file,
the rule (``rule "name" (#2)``) and the field (``match.subject_regex``). Unknown keys are errors,
so a typo never silently turns a condition off. ``RuleSetCache`` reloads when the file (or a
template file it names) changes, and keeps the previous good rules when the new file is broken.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from emailops.rules.model import (
    Condition,
    LlmSpec,
    MatchKind,
    ReplyAction,
    ReplySpec,
    Rule,
    RulesError,
    RuleSet,
)
from emailops.rules.patterns import PatternError, compile_pattern
from emailops.rules.templates import LLM_PLACEHOLDERS, Template, TemplateError

# The outbox's rule_name column is String(200).
MAX_RULE_NAME = 200

_RULE_KEYS = {"name", "folders", "match", "reply", "actions"}
_MATCH_TEXT_FIELDS = {"subject": MatchKind.SUBSTRING, "body": MatchKind.SUBSTRING}
_MATCH_ADDRESS_FIELDS = ("from", "to", "cc")
_MATCH_KEYS = (
    {"mode", "headers", "headers_regex", "accounts"}
    | set(_MATCH_TEXT_FIELDS)
    | set(_MATCH_ADDRESS_FIELDS)
    | {f"{name}_regex" for name in (*_MATCH_TEXT_FIELDS, *_MATCH_ADDRESS_FIELDS)}
)
_REPLY_KEYS = {
    "template",
    "template_file",
    "html_template",
    "html_template_file",
    "subject",
    "once_per_sender_days",
    "draft",
    "llm_prompt",
    "llm_prompt_file",
    "llm_model",
    "llm_max_tokens",
    "llm_temperature",
}
_LLM_KEYS = {"llm_prompt", "llm_prompt_file", "llm_model", "llm_max_tokens", "llm_temperature"}
# A model's reply is bounded: a draft of a few pages at most.
MAX_LLM_TOKENS = 8192
_ACTION_KEYS = {"flag", "mark_seen", "move", "stop"}
_MOVE_KEYS = {"folder", "create"}


class _RuleContext:
    """Builds error messages that name the file, the rule and the field."""

    def __init__(self, path: Path, index: int, name: str | None) -> None:
        self.path = path
        self.index = index
        self.name = name

    def error(self, field: str, problem: str) -> RulesError:
        who = f'rule "{self.name}" (#{self.index})' if self.name else f"rule #{self.index}"
        return RulesError(f"{self.path}: {who}: {field}: {problem}", rule_index=self.index, field=field)


def load_rules(path: Path) -> RuleSet:
    """Read and validate ``path``. A missing file is an error here (the cache treats it as no rules)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RulesError(f"{path}: cannot read the rules file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise RulesError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path}: TOML syntax error: {exc}") from None
    return parse_rules(data, path=path)


def parse_rules(data: dict[str, Any], *, path: Path) -> RuleSet:
    """Validate an already decoded rules document; template files are read relative to ``path``."""
    unknown = set(data) - {"rules"}
    if unknown:
        raise RulesError(f"{path}: unknown top-level key(s) {_names(unknown)}; rules go in [[rules]] tables")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise RulesError(f"{path}: 'rules' must be an array of tables ([[rules]])")
    sources: list[Path] = [path]
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_rules, start=1):
        rule = _parse_rule(raw, path=path, index=index, sources=sources)
        if rule.name in seen:
            raise _RuleContext(path, index, rule.name).error(
                "name", f"duplicate rule name (also rule #{seen[rule.name]}); names must be unique"
            )
        seen[rule.name] = index
        rules.append(rule)
    return RuleSet(rules=tuple(rules), sources=tuple(sources))


def _parse_rule(raw: dict[str, Any], *, path: Path, index: int, sources: list[Path]) -> Rule:
    name = raw.get("name")
    ctx = _RuleContext(path, index, name if isinstance(name, str) and name.strip() else None)
    if not isinstance(name, str) or not name.strip():
        raise ctx.error("name", "missing or empty; every rule needs a unique name")
    if len(name) > MAX_RULE_NAME or any(ch in name for ch in "\r\n\0"):
        raise ctx.error("name", f"must be one line of at most {MAX_RULE_NAME} characters")
    _reject_unknown(ctx, "", raw, _RULE_KEYS)

    folders = raw.get("folders", ["INBOX"])
    if (
        not isinstance(folders, list)
        or not folders
        or not all(isinstance(f, str) and f.strip() for f in folders)
    ):
        raise ctx.error("folders", 'must be a non-empty list of folder names, e.g. ["INBOX"]')

    match = _table(ctx, raw, "match")
    match_all, conditions = _parse_match(ctx, match)
    accounts = match.get("accounts", [])
    if not isinstance(accounts, list) or not all(isinstance(a, str) and a.strip() for a in accounts):
        raise ctx.error("match.accounts", 'must be a list of account names, e.g. ["support"]')

    reply_table = raw.get("reply")
    reply = None
    if reply_table is not None:
        if not isinstance(reply_table, dict):
            raise ctx.error("reply", "must be a table ([rules.reply])")
        reply = _parse_reply(ctx, reply_table, base_dir=path.parent, sources=sources)

    actions = _table(ctx, raw, "actions")
    _reject_unknown(ctx, "actions.", actions, _ACTION_KEYS)
    flag = _bool(ctx, actions, "flag", "actions.flag")
    mark_seen = _bool(ctx, actions, "mark_seen", "actions.mark_seen")
    stop = _bool(ctx, actions, "stop", "actions.stop")
    move_to, create_move_folder = _parse_move(ctx, actions.get("move"))
    if reply is None and not (flag or mark_seen or stop or move_to):
        raise ctx.error(
            "reply", "the rule does nothing: give it [rules.reply] or an action in [rules.actions]"
        )

    return Rule(
        name=name,
        index=index,
        folders=tuple(folders),
        match_all=match_all,
        accounts=tuple(accounts),
        conditions=conditions,
        reply=reply,
        flag=flag,
        mark_seen=mark_seen,
        move_to=move_to,
        create_move_folder=create_move_folder,
        stop=stop,
    )


def _parse_move(ctx: _RuleContext, move: Any) -> tuple[str | None, bool]:
    """``move = "Folder"``, or ``move = { folder = "Folder", create = true }``: the folder, and
    whether to create it when the server does not have it."""
    if move is None:
        return None, False
    if isinstance(move, dict):
        _reject_unknown(ctx, "actions.move.", move, _MOVE_KEYS)
        folder = move.get("folder")
        if not isinstance(folder, str) or not folder.strip():
            raise ctx.error("actions.move.folder", "must be a folder name")
        return folder, _bool(ctx, move, "create", "actions.move.create")
    if not isinstance(move, str) or not move.strip():
        raise ctx.error("actions.move", 'must be a folder name, or { folder = "...", create = true }')
    return move, False


def _parse_match(ctx: _RuleContext, match: dict[str, Any]) -> tuple[bool, tuple[Condition, ...]]:
    _reject_unknown(ctx, "match.", match, _MATCH_KEYS)
    mode = match.get("mode", "all")
    if mode not in ("all", "any"):
        raise ctx.error("match.mode", f'must be "all" or "any", not {mode!r}')
    conditions: list[Condition] = []
    for key in sorted(set(match) - {"mode", "headers", "headers_regex", "accounts"}):
        if key.endswith("_regex"):
            field = key.removesuffix("_regex")
            kind = MatchKind.REGEX
        else:
            field = key
            kind = MatchKind.GLOB if key in _MATCH_ADDRESS_FIELDS else _MATCH_TEXT_FIELDS[key]
        conditions.append(_condition(ctx, f"match.{key}", field, kind, match[key]))
    for key, kind in (("headers", MatchKind.SUBSTRING), ("headers_regex", MatchKind.REGEX)):
        headers = match.get(key, {})
        if not isinstance(headers, dict):
            raise ctx.error(f"match.{key}", 'must be a table of header name = pattern, e.g. {"X-Tag" = "a"}')
        for header_name, value in headers.items():
            if not re.fullmatch(r"[!-9;-~]+", header_name):
                raise ctx.error(f"match.{key}.{header_name}", "is not a valid header name")
            conditions.append(
                _condition(ctx, f"match.{key}.{header_name}", f"header:{header_name.lower()}", kind, value)
            )
    return mode == "all", tuple(conditions)


def _condition(ctx: _RuleContext, where: str, field: str, kind: MatchKind, value: Any) -> Condition:
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise ctx.error(where, "must be a string or a non-empty list of strings")
    regexes = []
    if kind is MatchKind.REGEX:
        for pattern in patterns:
            try:
                regexes.append(compile_pattern(pattern))
            except PatternError as exc:
                raise ctx.error(where, f"invalid regular expression {pattern!r}: {exc}") from None
    return Condition(field=field, kind=kind, patterns=tuple(patterns), regexes=tuple(regexes))


def _parse_reply(
    ctx: _RuleContext, table: dict[str, Any], *, base_dir: Path, sources: list[Path]
) -> ReplySpec:
    _reject_unknown(ctx, "reply.", table, _REPLY_KEYS)
    llm = _parse_llm(ctx, table, base_dir=base_dir, sources=sources)
    body = _template(ctx, table, "template", "template_file", base_dir=base_dir, sources=sources)
    html = _template(ctx, table, "html_template", "html_template_file", base_dir=base_dir, sources=sources)
    if llm is not None and (body is not None or html is not None):
        raise ctx.error(
            "reply.llm_prompt",
            "a reply is written either by a template or by the model (llm_prompt), not both",
        )
    if llm is None and body is None:
        raise ctx.error("reply.template", "missing: give template, template_file or llm_prompt")
    subject = None
    if "subject" in table:
        if not isinstance(table["subject"], str) or not table["subject"].strip():
            raise ctx.error("reply.subject", "must be a non-empty string")
        subject = _compile(ctx, "reply.subject", table["subject"])
    days = table.get("once_per_sender_days", 7)
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise ctx.error("reply.once_per_sender_days", f"must be a whole number of days >= 0, not {days!r}")
    # A model's reply is a draft for a person to review unless the rule opts in to sending it.
    draft = _bool(ctx, table, "draft", "reply.draft", default=llm is not None)
    return ReplySpec(
        body=body,
        html=html,
        subject=subject,
        once_per_sender_days=days,
        action=ReplyAction.DRAFT if draft else ReplyAction.SEND,
        llm=llm,
    )


def _parse_llm(
    ctx: _RuleContext, table: dict[str, Any], *, base_dir: Path, sources: list[Path]
) -> LlmSpec | None:
    prompt = _template(
        ctx,
        table,
        "llm_prompt",
        "llm_prompt_file",
        base_dir=base_dir,
        sources=sources,
        extra=LLM_PLACEHOLDERS,
    )
    if prompt is None:
        given = sorted(set(table) & _LLM_KEYS)
        if given:
            raise ctx.error(f"reply.{given[0]}", "only for a model's reply: give llm_prompt too")
        return None
    model = table.get("llm_model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 200):
        raise ctx.error("reply.llm_model", "must be a model name (non-empty text of at most 200 characters)")
    max_tokens = table.get("llm_max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= MAX_LLM_TOKENS
    ):
        raise ctx.error(
            "reply.llm_max_tokens", f"must be a whole number from 1 to {MAX_LLM_TOKENS}, not {max_tokens!r}"
        )
    temperature = table.get("llm_temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise ctx.error("reply.llm_temperature", f"must be a number from 0 to 2, not {temperature!r}")
    return LlmSpec(
        prompt=prompt,
        model=model,
        max_tokens=max_tokens,
        temperature=float(temperature) if temperature is not None else None,
    )


def _template(
    ctx: _RuleContext,
    table: dict[str, Any],
    inline_key: str,
    file_key: str,
    *,
    base_dir: Path,
    sources: list[Path],
    extra: dict[str, str] | None = None,
) -> Template | None:
    if inline_key in table and file_key in table:
        raise ctx.error(f"reply.{inline_key}", f"give either {inline_key} or {file_key}, not both")
    if inline_key in table:
        text = table[inline_key]
        if not isinstance(text, str) or not text.strip():
            raise ctx.error(f"reply.{inline_key}", "must be non-empty text")
        return _compile(ctx, f"reply.{inline_key}", text, extra)
    if file_key in table:
        name = table[file_key]
        if not isinstance(name, str) or not name.strip():
            raise ctx.error(f"reply.{file_key}", "must be a file name")
        file = (base_dir / name).resolve()
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ctx.error(f"reply.{file_key}", f"cannot read {file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ctx.error(f"reply.{file_key}", f"{file} is not UTF-8 text") from None
        sources.append(file)
        return _compile(ctx, f"reply.{file_key} ({file})", text, extra)
    return None


def _compile(ctx: _RuleContext, where: str, text: str, extra: dict[str, str] | None = None) -> Template:
    try:
        return Template.parse(text, extra=extra)
    except TemplateError as exc:
        raise ctx.error(where, str(exc)) from None


def _table(ctx: _RuleContext, raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ctx.error(key, f"must be a table ([rules.{key}])")
    return value


def _bool(ctx: _RuleContext, table: dict[str, Any], key: str, where: str, *, default: bool = False) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ctx.error(where, f"must be true or false, not {value!r}")
    return value


def _reject_unknown(ctx: _RuleContext, prefix: str, table: dict[str, Any], known: set[str]) -> None:
    unknown = set(table) - known
    if unknown:
        first = sorted(unknown)[0]
        raise ctx.error(f"{prefix}{first}", f"unknown key; known keys here: {_names(known)}")


def _names(names: set[str]) -> str:
    return ", ".join(sorted(names))


@dataclass(frozen=True)
class _Signature:
    # (path, mtime_ns, size, inode) of the rules file and each template file; None when missing.
    files: tuple[tuple[str, int, int, int] | None, ...]


def _signature(paths: tuple[Path, ...]) -> _Signature:
    entries: list[tuple[str, int, int, int] | None] = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            entries.append(None)
            continue
        entries.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
    return _Signature(tuple(entries))


class RuleSetCache:
    """The current rules of one file, reloaded when it or a template file it uses changes.

    No path, or no file: no rules (index only). A file that fails to load is logged (component
    ``rules``) once per change and the previous good rules stay in force; with no previous good
    rules that means no rules, so a broken file never makes the daemon answer mail.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._rules = RuleSet()
        self._signature: _Signature | None = None
        self.last_error: str | None = None
        self._log = structlog.get_logger().bind(component="rules")

    def get(self) -> RuleSet:
        if self.path is None:
            return self._rules
        watched = self._rules.sources if self._rules.sources else (self.path,)
        if self._signature is not None and _signature(watched) == self._signature:
            return self._rules
        if not self.path.exists():
            if self._rules.rules or self._signature is None:
                self._log.info("no rules file: automatic replies are off", rules_file=str(self.path))
            self._rules = RuleSet()
            self._signature = _signature((self.path,))
            self.last_error = None
            return self._rules
        # Taken before reading, so a write during the read is seen as a change next time.
        before_rules_file = _signature((self.path,))
        try:
            rules = load_rules(self.path)
        except RulesError as exc:
            self.last_error = str(exc)
            self._log.error(
                "rules file invalid; keeping the previous rules",
                rules_file=str(self.path),
                error=str(exc),
                rules_in_force=len(self._rules),
            )
            # Watch the broken file so that the next edit is tried, but keep the good rules.
            self._signature = before_rules_file
            self._rules = RuleSet(rules=self._rules.rules, sources=(self.path,))
            return self._rules
        self.last_error = None
        self._rules = rules
        self._signature = _signature(rules.sources)
        if before_rules_file.files[0] != self._signature.files[0]:
            self._signature = _Signature((None, *self._signature.files[1:]))
        self._log.info("rules loaded", rules_file=str(self.path), rules=len(rules))
        return rules
