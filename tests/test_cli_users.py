"""``emailops users`` and ``emailops audit`` as an operator runs them, on SQLite and PostgreSQL."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emailops.users import accounts
from tests.index_helpers import index_engine

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a different long pass phrase"


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    """Settings that validate; no server is contacted by these commands."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("EMAIL_", "SENTRY_"))}
    env.update(
        {
            "EMAIL_IMAP_HOST": "127.0.0.1",
            "EMAIL_IMAP_PORT": "1",
            "EMAIL_SMTP_HOST": "127.0.0.1",
            "EMAIL_SMTP_PORT": "1",
            "EMAIL_USERNAME": "alice@example.org",
            "EMAIL_PASSWORD": "imap password",
            "INDEX_DB_URL": db_url,
            "STATE_DIR": str(tmp_path / "state"),
            "CACHE_DIR": str(tmp_path / "cache"),
            "LOG_FILE_PATH": str(tmp_path / "logs" / "app.log"),
            "RULES_FILE": str(tmp_path / "rules.toml"),
            "ENV": "test",
        }
    )
    return env


class Cli:
    """Runs ``python -m emailops``; keeps every output, to look for secrets in them all."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.outputs: list[str] = []

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "emailops", *args],
            env=self.env,
            cwd=REPO,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.outputs += [result.stdout, result.stderr]
        return result


def audit_lines(stderr: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("component") == "audit"]


def test_users_are_managed_and_every_change_audited_without_a_secret_anywhere(
    env: dict[str, str], db_url: str
) -> None:
    cli = Cli(env)
    me = f"cli:{getpass.getuser()}"
    changes: list[tuple[str, str]] = []

    def change(action: str, *args: str, stdin: str | None = None) -> str:
        result = cli("users", *args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        [line] = audit_lines(result.stderr)
        assert (line["action"], line["actor"], line["role"], line["level"]) == (action, me, "admin", "INFO")
        changes.append((action, args[1]))
        return result.stdout.strip()

    generated = change("user.add", "add", "alice", "--role", "operator")
    assert len(generated) >= 20 and "\n" not in generated
    assert (
        change("user.add", "add", "bob", "--role", "viewer", "--password-stdin", stdin=PASSWORD + "\n") == ""
    )
    token = change("user.token", "token", "alice")
    assert token.startswith("eo_")
    assert change("user.passwd", "passwd", "bob", "--password-stdin", stdin=NEW_PASSWORD + "\n") == ""
    change("user.disable", "disable", "bob")
    change("user.enable", "enable", "bob")

    engine = index_engine(db_url)
    try:
        assert accounts.verify_sign_in(engine, "alice", generated) is not None
        assert accounts.verify_sign_in(engine, "bob", PASSWORD) is None
        signed_in = accounts.verify_sign_in(engine, "bob", NEW_PASSWORD)
        assert signed_in is not None and signed_in.role == "viewer"
        signed = accounts.verify_api_token(engine, token)
        assert signed is not None and signed.name == "alice"
    finally:
        engine.dispose()

    refused = cli("users", "remove", "bob")
    assert refused.returncode == 2 and "--yes" in refused.stderr and audit_lines(refused.stderr) == []
    change("user.remove", "remove", "bob", "--yes")
    change("user.disable", "disable", "alice")
    assert cli("users", "disable", "alice").stderr.count('"component":"audit"') == 0  # already disabled

    listed = cli("users", "list", "--json")
    assert listed.returncode == 0
    [alice] = json.loads(listed.stdout)
    assert (alice["name"], alice["role"], alice["disabled"], alice["has_api_token"]) == (
        "alice",
        "operator",
        True,
        True,
    )
    assert "password_hash" not in alice and "token_hash" not in alice
    text_list = cli("users", "list")
    assert "alice" in text_list.stdout and "bob" not in text_list.stdout

    audit = cli("audit", "--json")
    assert audit.returncode == 0
    entries = json.loads(audit.stdout)
    assert [(e["action"], e["target"]) for e in reversed(entries)] == changes
    assert {(e["actor"], e["role"], e["source"]) for e in entries} == {(me, "admin", None)}
    assert entries[-1]["after"] == {"name": "alice", "role": "operator", "disabled": False}
    assert [e["target"] for e in entries if e["action"] == "user.remove"] == ["bob"]

    filtered = cli("audit", "--json", "--action", "user.token", "--action", "user.passwd")
    assert [(e["action"], e["target"]) for e in json.loads(filtered.stdout)] == [
        ("user.passwd", "bob"),
        ("user.token", "alice"),
    ]
    assert len(json.loads(cli("audit", "--json", "--since", "1h").stdout)) == len(entries)
    assert json.loads(cli("audit", "--json", "--since", "2999-01-01").stdout) == []
    assert json.loads(cli("audit", "--json", "--user", "cli:somebody-else").stdout) == []
    assert len(json.loads(cli("audit", "--json", "--user", me, "--limit", "2").stdout)) == 2
    text_audit = cli("audit")
    assert f"{me} (admin)  user.remove  bob" in text_audit.stdout

    printed_once = [output for output in cli.outputs if generated in output]
    assert len(printed_once) == 1
    shown = [output for output in cli.outputs if token in output or token[3:] in output]
    assert len(shown) == 1
    for secret in (PASSWORD, NEW_PASSWORD):
        assert not [output for output in cli.outputs if secret in output]


def test_refused_changes_say_why_and_record_nothing(env: dict[str, str]) -> None:
    cli = Cli(env)
    assert cli("users", "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD).returncode == 0
    for args, stdin, why in (
        (("add", "alice", "--role", "viewer"), None, "exists already"),
        (("add", "eve", "--role", "viewer", "--password-stdin"), "too short\n", "15 to 1024 characters"),
        (("add", "eve", "--role", "viewer", "--password-stdin"), "", "15 to 1024 characters"),
        (("passwd", "alice", "--password-stdin"), "short\n", "15 to 1024 characters"),
        (("disable", "nobody"), None, "no user 'nobody'"),
        (("token", "nobody"), None, "no user 'nobody'"),
        (("remove", "nobody", "--yes"), None, "no user 'nobody'"),
    ):
        result = cli("users", *args, stdin=stdin)
        assert result.returncode == 1, args
        assert why in result.stderr and audit_lines(result.stderr) == [], args
        assert result.stdout == "", args
    usage = cli("users", "add", "eve", "--role", "root")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    bad_since = cli("audit", "--since", "yesterday")
    assert bad_since.returncode == 2 and "ISO 8601" in bad_since.stderr
    assert [e["action"] for e in json.loads(cli("audit", "--json").stdout)] == ["user.add"]


@pytest.mark.parametrize(
    "command",
    [
        "users",
        "users list",
        "users add",
        "users disable",
        "users enable",
        "users remove",
        "users passwd",
        "users token",
        "users unlock",
        "audit",
    ],
)
def test_the_commands_have_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emailops", *command.split(), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "usage: emailops" in result.stdout


def test_unlock_lifts_a_console_lockout_and_is_audited(env: dict[str, str], db_url: str) -> None:
    from datetime import UTC, datetime

    from emailops.store.database import reading
    from emailops.users import sign_in_throttle

    cli = Cli(env)
    engine = index_engine(db_url)
    policy = sign_in_throttle.ThrottlePolicy()
    now = datetime.now(UTC)
    locked = [
        sign_in_throttle.record_failure(engine, "carol", f"192.0.2.{n}", now, policy)
        for n in range(policy.max_failures)
    ]
    assert locked[-1] and not any(locked[:-1])

    result = cli("users", "unlock", "carol")
    assert result.returncode == 0 and "carol: lockout lifted" in result.stderr
    (line,) = audit_lines(result.stderr)
    assert (line["action"], line["target"]) == ("sign_in.unlock", "carol")
    with reading(engine) as conn:
        assert sign_in_throttle.locked_names(conn) == []
        assert not sign_in_throttle.refused(conn, "carol", "192.0.2.99", now, policy)
    again = cli("users", "unlock", "carol")
    assert again.returncode == 0 and "carol: not locked out" in again.stderr
    assert audit_lines(again.stderr) == []
    engine.dispose()
