"""Static security checks as part of the suite: the runbook's monthly bandit scan, on every run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bandit_finds_nothing_of_medium_or_high_severity() -> None:
    """Every medium or high finding is fixed, or justified where it stands (``# nosec BXXX``
    beside a comment that gives the reason)."""
    result = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", "emailops/", "prod/", "localmail/",
         "--severity-level", "medium", "--format", "json", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    report = json.loads(result.stdout)
    findings = [
        f"{item['filename']}:{item['line_number']} {item['test_id']} {item['issue_text']}"
        for item in report["results"]
    ]
    assert findings == [], "\n".join(findings)
    assert report["errors"] == []
    assert report["metrics"]["_totals"]["loc"] > 1000  # the packages were scanned, not an empty tree
    assert result.returncode == 0, result.stderr


def test_lint_and_types_are_clean() -> None:
    """ruff (the rules in pyproject.toml) and mypy --strict over the product's packages and the
    test servers (localmail): a finding fails the suite, not a review."""
    for command in (
        ["ruff", "check", "--no-cache", "."],
        ["ruff", "format", "--check", "--no-cache", "."],
        ["mypy", "--no-incremental"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", *command],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}{result.stderr}"
        assert result.stdout.strip(), f"{command[0]} printed nothing: did it run?"
