"""Check the text of a rules file before it is saved (the console's editor, ``emailops rules
check``): the errors of ``load_rules``, each at its line.

TOML syntax errors carry their line; a rule's error names the rule's index and the field, found
back in the text: the line of the field's key within that rule's ``[[rules]]`` section, or of the
table it belongs to, or of the section's header when neither is written there (a missing key).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from emailops.rules.loader import parse_rules
from emailops.rules.model import RulesError

_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_RULES_HEADER = re.compile(r"^\s*\[\[\s*rules\s*\]\]")


@dataclass(frozen=True)
class RulesProblem:
    """One error of a rules text, at its line (from 1; None when it is of the whole file)."""

    line: int | None
    message: str


def validate_rules_text(text: str, *, path: Path) -> list[RulesProblem]:
    """The errors ``load_rules`` would give for ``text`` saved at ``path`` (template files are read
    relative to it), each with its line; empty when the text is valid."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE.search(str(exc))
        return [RulesProblem(int(found[1]) if found else None, f"{path}: TOML syntax error: {exc}")]
    try:
        parse_rules(data, path=path)
    except RulesError as exc:
        return [RulesProblem(error_line(text, exc), str(exc))]
    return []


def error_line(text: str, error: RulesError) -> int | None:
    """The line of ``text`` that ``error`` (of a rule) is about, or None (an error of the file)."""
    if error.rule_index is None:
        return None
    lines = text.splitlines()
    headers = [number for number, line in enumerate(lines) if _RULES_HEADER.match(line)]
    if error.rule_index > len(headers):
        return None
    start = headers[error.rule_index - 1]
    end = headers[error.rule_index] if error.rule_index < len(headers) else len(lines)
    # The field's own key, else the table it is missing from (``reply`` of ``reply.template``).
    for key in reversed((error.field or "").split(" ")[0].split(".")):
        written = re.compile(
            rf"(?:^|[\s{{,]){re.escape(key)}\s*=|^\s*\[\s*rules\.(?:[\w.]+\.)?{re.escape(key)}\s*\]"
        )
        for number in range(start, end):
            if written.search(lines[number]):
                return number + 1
    return start + 1
