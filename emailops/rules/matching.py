"""Whether a rule matches one parsed message in one folder. Pure functions of their arguments."""

from __future__ import annotations

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


def rule_matches(rule: Rule, parsed: ParsedMessage, folder: str) -> bool:
    """True when the rule watches ``folder`` and its conditions hold (all or any; none: always)."""
    if not rule.applies_to_folder(folder):
        return False
    if not rule.conditions:
        return True
    results = (condition_holds(c, parsed) for c in rule.conditions)
    return all(results) if rule.match_all else any(results)


def matching_rules(rules: RuleSet, parsed: ParsedMessage, folder: str) -> list[Rule]:
    """The rules that match, in file order, up to and including the first matching rule with stop."""
    matched: list[Rule] = []
    for rule in rules.rules:
        if rule_matches(rule, parsed, folder):
            matched.append(rule)
            if rule.stop:
                break
    return matched
