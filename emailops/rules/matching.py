"""Whether a rule matches one parsed message in one folder. Pure functions of their arguments."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from emailops.mime.model import ParsedMessage
from emailops.rules.model import Condition, MatchKind, Rule, RuleSet


def field_values(parsed: ParsedMessage, field: str) -> tuple[str, ...]:
    """The values a condition on ``field`` is tested against (addresses are the bare addr-specs)."""
    if field == "subject":
        return (parsed.subject,)
    if field == "body":
        return (parsed.body_text,)
    if field == "from":
        return tuple(a.email for a in parsed.from_)
    if field == "to":
        return tuple(a.email for a in parsed.to)
    if field == "cc":
        return tuple(a.email for a in parsed.cc)
    if field.startswith("header:"):
        return parsed.headers.get(field.removeprefix("header:"), ())
    raise ValueError(f"unknown match field {field!r}")


def condition_holds(condition: Condition, parsed: ParsedMessage) -> bool:
    values = field_values(parsed, condition.field)
    if condition.kind is MatchKind.REGEX:
        return any(rx.search(v) for rx in condition.regexes for v in values)
    if condition.kind is MatchKind.GLOB:
        lowered = [v.lower() for v in values]
        return any(fnmatchcase(v, p.lower()) for p in condition.patterns for v in lowered)
    lowered = [v.casefold() for v in values]
    return any(p.casefold() in v for p in condition.patterns for v in lowered)


def rule_matches(rule: Rule, parsed: ParsedMessage, folder: str, account: str = "") -> bool:
    """True when the rule watches ``folder`` of ``account`` (its name) and its conditions hold (all
    or any; none: always)."""
    if not rule.applies_to_folder(folder) or (rule.accounts and account not in rule.accounts):
        return False
    if not rule.conditions:
        return True
    results = (condition_holds(c, parsed) for c in rule.conditions)
    return all(results) if rule.match_all else any(results)


def matching_rules(rules: RuleSet, parsed: ParsedMessage, folder: str, account: str = "") -> list[Rule]:
    """The rules that match, in file order, up to and including the first matching rule with stop."""
    matched: list[Rule] = []
    for rule in rules.rules:
        if rule_matches(rule, parsed, folder, account):
            matched.append(rule)
            if rule.stop:
                break
    return matched


def unknown_accounts(rules: RuleSet, names: Iterable[str]) -> list[tuple[Rule, str]]:
    """Each (rule, name) where the rule's ``match.accounts`` names no account of ``names``."""
    known = set(names)
    return [(rule, name) for rule in rules.rules for name in rule.accounts if name not in known]
