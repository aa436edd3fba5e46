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


def test_every_variable_in_a_docs_table_is_a_setting() -> None:
    settings = {name.upper() for name in RuntimeSettings.model_fields}
    tables = (REPO / "README.md").read_text() + (REPO / "RUNBOOK.md").read_text()
    listed = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", tables, re.MULTILINE))
    assert listed and listed - settings == set()


def test_sentry_settings_are_in_the_runbook_table_with_their_defaults() -> None:
    runbook = (REPO / "RUNBOOK.md").read_text()
    example = (REPO / ".env.example").read_text()
    for name in ("SENTRY_DSN", "SENTRY_SEND_PII"):
        (row,) = [line for line in runbook.splitlines() if line.startswith(f"| `{name}` |")]
        default = RuntimeSettings.model_fields[name.lower()].default
        shown = str(default).lower() if isinstance(default, bool) else default
        assert row.split("|")[2].strip() == (shown or "(empty)")
        assert re.search(rf"^{name}={shown}$", example, re.MULTILINE)
