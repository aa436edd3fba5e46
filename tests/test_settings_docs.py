"""Every setting is documented: .env.example names each one, and the runbook's tables name the
Sentry settings with their defaults."""

from __future__ import annotations

import re
from pathlib import Path

from prod.runtime_settings import RuntimeSettings

REPO = Path(__file__).resolve().parent.parent


def test_env_example_lists_every_setting() -> None:
    example = (REPO / ".env.example").read_text()
    missing = [
        name.upper()
        for name in RuntimeSettings.model_fields
        if not re.search(rf"^(# )?{name.upper()}=", example, re.MULTILINE)
    ]
    assert missing == []


def _settings_table_rows(text: str) -> set[str]:
    """The first column of every table whose header names variables or settings (other tables,
    such as the search operators', hold upper-case words that are no setting)."""
    names: set[str] = set()
    header = ""
    for line in text.splitlines():
        if not line.startswith("|"):
            header = ""
            continue
        if not header:
            header = line.split("|")[1].strip().lower()
            continue
        found = re.match(r"^\| `([A-Z][A-Z0-9_]+)` \|", line)
        if found and header in ("variable", "setting"):
            names.add(found.group(1))
    return names


def test_every_variable_in_a_docs_table_is_a_setting() -> None:
    settings = {name.upper() for name in RuntimeSettings.model_fields}
    listed = _settings_table_rows((REPO / "README.md").read_text() + "\n" + (REPO / "RUNBOOK.md").read_text())
    assert {"WORKERS", "SENTRY_DSN", "REPLY_HISTORY_DAYS"} <= listed
    assert listed - settings == set()


def test_sentry_settings_are_in_the_runbook_table_with_their_defaults() -> None:
    runbook = (REPO / "RUNBOOK.md").read_text()
    example = (REPO / ".env.example").read_text()
    for name in ("SENTRY_DSN", "SENTRY_SEND_PII"):
        (row,) = [line for line in runbook.splitlines() if line.startswith(f"| `{name}` |")]
        default = RuntimeSettings.model_fields[name.lower()].default
        shown = str(default).lower() if isinstance(default, bool) else default
        assert row.split("|")[2].strip() == (shown or "(empty)")
        assert re.search(rf"^{name}={shown}$", example, re.MULTILINE)
