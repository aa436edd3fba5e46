"""Rule patterns compiled for RE2, a linear-time engine: the text they meet is an outsider's.

Python's ``re`` backtracks, so a pattern such as ``(a+)+$`` takes exponential time on a subject an
attacker writes, and the worker that evaluates it stalls. RE2 (the ``google-re2`` package) never
backtracks: matching is linear in the text. It cannot run backreferences or look-around; such a
pattern is refused when the rules are loaded, with an error naming the rule and the field.
"""

from __future__ import annotations

from typing import Protocol

import re2

# Options shared by every rule pattern: case-insensitive, as rules always were; errors are raised,
# not also printed on stderr (which would break the one-JSON-object-per-line log).
_OPTIONS = re2.Options()
_OPTIONS.case_sensitive = False
_OPTIONS.log_errors = False


class Pattern(Protocol):
    pattern: str

    def search(self, text: str) -> object | None: ...


class PatternError(ValueError):
    """A pattern RE2 cannot compile; the message says why."""


def compile_pattern(pattern: str) -> Pattern:
    try:
        return re2.compile(pattern, _OPTIONS)  # type: ignore[no-any-return]
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if isinstance(exc.args[0], bytes) else str(exc)
        if "perl operator" in reason or "escape sequence" in reason:
            reason += " (rules use RE2, a linear-time engine: no backreferences, no look-around)"
        raise PatternError(reason) from None
