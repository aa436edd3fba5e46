"""The emailops command line as an operator uses it, against a real Dovecot."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from prod.cli import build_parser
from prod.localmail.dovecot import LocalDovecot
from tests.index_helpers import ALICE, daemon_env, message

REPO = Path(__file__).resolve().parents[1]


def emailops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailops", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def env(dovecot: LocalDovecot, tmp_path: Path) -> dict[str, str]:
    dovecot.append(
        ALICE, "INBOX", message(1, subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?= from Zürich", body="otter")
    )
    dovecot.append(ALICE, "INBOX", message(2, body="badger and otter"))
    return daemon_env(dovecot, tmp_path)


def test_every_command_has_help() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"sync", "search", "stats", "reindex", "backup", "check-config", "migrate"} <= set(commands)
    for name in commands:
        result = subprocess.run(
            [sys.executable, "-m", "emailops", *name.split(), "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "usage: emailops" in result.stdout, name


def test_sync_search_stats(env: dict[str, str]) -> None:
    synced = emailops(env, "sync", "--once")
    assert synced.returncode == 0, synced.stderr
    assert "INBOX: 2 new" in synced.stdout
    for line in synced.stderr.splitlines():  # logs are JSON lines on stderr, stdout is the answer
        json.loads(line)

    found = emailops(env, "search", "--json", "otter")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert {h["uid"] for h in hits} == {1, 2}
    assert set(hits[0]) == {"folder", "uid", "message_id", "from", "subject", "date", "snippet"}
    accented = json.loads(emailops(env, "search", "--json", "grüße").stdout)
    assert [h["subject"] for h in accented] == ["Grüße from Zürich"]

    stats = json.loads(emailops(env, "stats", "--json").stdout)
    assert stats["messages_total"] == 2
    (folder,) = stats["folders"]
    assert folder["name"] == "INBOX" and folder["messages"] == 2
    assert isinstance(folder["uidvalidity"], int) and folder["last_sync"]


def test_reindex_rebuilds_and_answers_nothing_old(
    env: dict[str, str], dovecot: LocalDovecot, tmp_path: Path
) -> None:
    assert emailops(env, "sync", "--once").returncode == 0
    dovecot.deliver(ALICE, message(3, body="newcomer"))
    assert emailops(env, "sync", "--once").returncode == 0
    (tmp_path / "emailops.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"emailops.db{suffix}").unlink(missing_ok=True)
    rebuilt = emailops(env, "reindex")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "INBOX: 3 new" in rebuilt.stdout
    with sqlite3.connect(tmp_path / "emailops.db") as db:
        assert db.execute("SELECT count(*), count(DISTINCT uid) FROM messages").fetchone() == (3, 3)
        assert db.execute("SELECT DISTINCT rules_state FROM messages").fetchall() == [("history",)]
    assert json.loads(emailops(env, "search", "--json", "newcomer").stdout)


def test_reindex_with_the_server_down_keeps_the_index(env: dict[str, str], dovecot: LocalDovecot) -> None:
    assert emailops(env, "sync", "--once").returncode == 0
    dovecot.stop()
    failed = emailops(env, "reindex")
    assert failed.returncode == 1 and "cannot connect" in failed.stderr
    assert len(json.loads(emailops(env, "search", "--json", "otter").stdout)) == 2


def test_backup_is_a_consistent_copy(env: dict[str, str], tmp_path: Path) -> None:
    assert emailops(env, "sync", "--once").returncode == 0
    target = tmp_path / "backups" / "emailops-backup.db"
    backed_up = emailops(env, "backup", str(target))
    assert backed_up.returncode == 0, backed_up.stderr
    with sqlite3.connect(target) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (2,)
    refused = emailops(env, "backup", str(tmp_path / "emailops.db"))
    assert refused.returncode == 1 and "overwrite the index" in refused.stderr


def test_check_config_masks_secrets_and_bad_config_names_the_variable(env: dict[str, str]) -> None:
    checked = emailops(env, "check-config", "--json")
    assert checked.returncode == 0, checked.stderr
    values = json.loads(checked.stdout)
    assert values["EMAIL_PASSWORD"] == "**********"
    assert env["EMAIL_PASSWORD"] not in checked.stdout + checked.stderr
    bad = emailops({**env, "EMAIL_IMAP_PORT": "70000"}, "check-config")
    assert bad.returncode == 78 and "EMAIL_IMAP_PORT" in bad.stderr


def test_migrate_reports_the_schema_version(env: dict[str, str]) -> None:
    first = emailops(env, "migrate")
    assert first.returncode == 0 and "applied 1" in first.stdout
    second = emailops(env, "migrate")
    assert second.returncode == 0 and "applied" not in second.stdout and "schema at version" in second.stdout
