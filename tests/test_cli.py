"""The emailops command line as an operator uses it, against a real Dovecot."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localmail.dovecot import LocalDovecot
from prod.cli import build_parser
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
    assert {
        "sync",
        "search",
        "stats",
        "reindex",
        "backup",
        "check-config",
        "migrate",
        "rules",
        "outbox",
        "llm",
    } <= set(commands)
    for name in [
        *commands,
        "rules check",
        "rules test",
        "outbox list",
        "outbox retry",
        "outbox cancel",
        "llm list",
        "llm retry",
        "llm cancel",
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "emailops", *name.split(), "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "usage: emailops" in result.stdout, name


@pytest.mark.parametrize("limit", ["0", "-1", "ten"])
def test_a_limit_below_one_is_a_usage_error(limit: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emailops", "search", "--limit", limit, "word"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"expected a whole number of at least 1, got {limit!r}" in result.stderr


def test_sync_search_stats(env: dict[str, str], tmp_path: Path) -> None:
    synced = emailops(env, "sync", "--once")
    assert synced.returncode == 0, synced.stderr
    assert "INBOX: 2 new" in synced.stdout
    for line in synced.stderr.splitlines():  # logs are JSON lines on stderr, stdout is the answer
        json.loads(line)
    # The command closed the index before exiting: its WAL is checkpointed and gone, so the
    # database file alone holds everything (a plain copy of it is a complete one).
    assert not (tmp_path / "emailops.db-wal").exists()

    found = emailops(env, "search", "--json", "otter")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert {h["uid"] for h in hits} == {1, 2}
    assert set(hits[0]) == {
        *("folder", "uidvalidity", "uid", "message_id", "thread", "from", "subject", "date"),
        *("snippet", "marks"),
    }
    accented = json.loads(emailops(env, "search", "--json", "grüße").stdout)
    in_inbox = emailops(env, "search", "--json", "--folder", "INBOX", "otter")
    assert {h["uid"] for h in json.loads(in_inbox.stdout)} == {1, 2}
    mistyped = emailops(env, "search", "--folder", "Inbx", "otter")
    assert mistyped.returncode == 2 and mistyped.stdout == ""
    assert "no folder 'Inbx' in the index (indexed: INBOX)" in mistyped.stderr
    assert [h["subject"] for h in accented] == ["Grüße from Zürich"]

    stats = json.loads(emailops(env, "stats", "--json").stdout)
    assert stats["messages_total"] == 2
    (folder,) = stats["folders"]
    assert folder["name"] == "INBOX" and folder["messages"] == 2
    assert isinstance(folder["uidvalidity"], int) and folder["last_sync"]


def test_sync_once_syncs_the_other_folders_and_fails_naming_a_missing_one(env: dict[str, str]) -> None:
    result = emailops({**env, "EMAIL_FOLDERS": "Projects,INBOX"}, "sync", "--once")
    assert result.returncode == 1
    assert "INBOX: 2 new" in result.stdout
    assert "Projects: does not exist on the server (check EMAIL_FOLDERS)" in result.stdout
    assert json.loads(emailops(env, "stats", "--json").stdout)["messages_total"] == 2


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


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The commands run with umask 022 (inherited), which made their files 0644 before."""
    umask = os.umask(0o022)
    yield
    os.umask(umask)


@pytest.mark.usefixtures("usual_umask")
def test_backup_is_a_consistent_copy(env: dict[str, str], tmp_path: Path) -> None:
    assert emailops(env, "sync", "--once").returncode == 0
    target = tmp_path / "backups" / "emailops-backup.db"
    backed_up = emailops(env, "backup", str(target))
    assert backed_up.returncode == 0, backed_up.stderr
    # The index the CLI created and the copy are readable by their owner only.
    assert stat.S_IMODE((tmp_path / "emailops.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with sqlite3.connect(target) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (2,)
    as_json = json.loads(emailops(env, "backup", "--json", str(target)).stdout)
    assert as_json == {"path": str(target), "bytes": target.stat().st_size, "integrity": "ok"}
    refused = emailops(env, "backup", str(tmp_path / "emailops.db"))
    assert refused.returncode == 1 and "overwrite the index" in refused.stderr


def test_check_config_masks_secrets_and_bad_config_names_the_variable(env: dict[str, str]) -> None:
    checked = emailops(env, "check-config", "--json")
    assert checked.returncode == 0, checked.stderr
    values = json.loads(checked.stdout)
    assert values["EMAIL_PASSWORD"] == "**********"
    assert env["EMAIL_PASSWORD"] not in checked.stdout + checked.stderr
    listed = emailops({**env, "EMAIL_FOLDERS": " INBOX , Sent Items,,INBOX"}, "check-config", "--json")
    assert json.loads(listed.stdout)["EMAIL_FOLDERS"] == ["INBOX", "Sent Items"]
    bad = emailops({**env, "EMAIL_IMAP_PORT": "70000"}, "check-config")
    assert bad.returncode == 78 and "EMAIL_IMAP_PORT" in bad.stderr


def test_migrate_reports_the_schema_version(env: dict[str, str]) -> None:
    first = emailops(env, "migrate")
    assert first.returncode == 0 and "applied 1" in first.stdout
    second = emailops(env, "migrate")
    assert second.returncode == 0 and "applied" not in second.stdout and "schema at version" in second.stdout
    as_json = json.loads(emailops(env, "migrate", "--json").stdout)
    assert as_json["applied"] == [] and as_json["version"] == int(second.stdout.split()[-1])


def test_rules_check_names_the_rule_and_field_and_needs_no_account(tmp_path: Path) -> None:
    good = tmp_path / "rules.toml"
    good.write_text(
        '[[rules]]\nname = "ack"\n[rules.match]\nsubject = "help"\n'
        '[rules.reply]\ntemplate = "Hi {sender_name}"\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "ack"\n[rules.reply]\ntemplate = "Hi {sender_nam}"\n')
    bare_env = {k: v for k, v in os.environ.items() if not k.startswith("EMAIL_")}
    ok = emailops(bare_env, "rules", "check", str(good))
    assert ok.returncode == 0 and "1 rule(s) valid" in ok.stdout, ok.stderr
    ok_json = emailops(bare_env, "rules", "check", "--json", str(good))
    assert json.loads(ok_json.stdout) == {"file": str(good), "rules": ["ack"]}
    failed = emailops(bare_env, "rules", "check", str(bad))
    assert failed.returncode == 1
    assert (
        'rule "ack"' in failed.stderr and "reply.template" in failed.stderr and "sender_nam" in failed.stderr
    )
    assert failed.stderr.rstrip().endswith("(line 4)")  # the line of template = ...
    example = emailops(bare_env, "rules", "check", str(REPO / "examples" / "rules.toml"))
    assert example.returncode == 0, example.stderr


def test_rules_check_server_lists_the_move_folders_the_server_does_not_have(
    env: dict[str, str], dovecot: LocalDovecot, tmp_path: Path
) -> None:
    dovecot.create_folder(ALICE, "Archive")
    rules = tmp_path / "moves.toml"
    rules.write_text(
        '[[rules]]\nname = "to-accounting"\n[rules.actions]\nmove = "Accounting"\n'
        '[[rules]]\nname = "to-archive"\n[rules.actions]\nmove = "Archive"\n'
        '[[rules]]\nname = "to-later"\n[rules.actions]\nmove = { folder = "Later", create = true }\n'
    )
    offline = emailops(env, "rules", "check", str(rules))
    assert offline.returncode == 0 and "missing" not in offline.stdout, offline.stdout

    checked = emailops(env, "rules", "check", "--server", str(rules))
    assert checked.returncode == 1, checked.stderr
    missing = [line for line in checked.stdout.splitlines() if line.startswith("missing folder")]
    assert missing == [
        'missing folder "Accounting": the server does not have it; moved to by rule "to-accounting"; '
        "those moves would fail",
        'missing folder "Later": the server does not have it; moved to by rule "to-later"; '
        "the daemon creates it (create = true)",
    ]
    assert checked.stdout.splitlines()[-1] == f"{rules}: 3 rule(s) valid, 1 move folder(s) missing"
    as_json = json.loads(emailops(env, "rules", "check", "--server", "--json", str(rules)).stdout)
    assert as_json["missing_folders"] == [
        {"folder": "Accounting", "rules": ["to-accounting"], "create": False},
        {"folder": "Later", "rules": ["to-later"], "create": True},
    ]

    dovecot.create_folder(ALICE, "Accounting")
    fixed = emailops(env, "rules", "check", "--server", str(rules))
    assert fixed.returncode == 0 and "Accounting" not in fixed.stdout, fixed.stdout


def test_outbox_list_retry_cancel(env: dict[str, str], tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import update

    from emailops.replies import outbox
    from emailops.store.schema import outbox as outbox_table
    from tests.index_helpers import index_engine

    engine = index_engine(env["INDEX_DB_URL"])
    with engine.begin() as conn:
        ids = [
            outbox.insert_reply(
                conn,
                account=f"{ALICE}@127.0.0.1",
                inbound_key=f"<in-{n}@example.org>",
                message_pk=None,
                rule_name="ack",
                action="send",
                recipient=f"person{n}@example.org",
                reply_message_id=f"<reply-{n}@example.test>",
                subject=f"Re: question {n}",
                raw=b"Subject: x\r\n\r\nbody\r\n",
                now=datetime.now(UTC),
            )[0]
            for n in (1, 2)
        ]
        conn.execute(
            update(outbox_table)
            .where(outbox_table.c.id == ids[0])
            .values(state="unknown", last_error="interrupted")
        )
    engine.dispose()

    listed = json.loads(emailops(env, "outbox", "list", "--json").stdout)
    assert {(r["id"], r["state"]) for r in listed} == {(ids[0], "unknown"), (ids[1], "pending")}
    assert [
        r["id"] for r in json.loads(emailops(env, "outbox", "list", "--state", "unknown", "--json").stdout)
    ] == [ids[0]]
    assert emailops(env, "outbox", "retry", str(ids[0])).returncode == 0
    assert emailops(env, "outbox", "cancel", str(ids[1])).returncode == 0
    refused = emailops(env, "outbox", "cancel", "999", str(ids[1]))
    assert refused.returncode == 1
    assert "not changed: reply 999: no such reply" in refused.stderr
    assert (
        f"not changed: reply {ids[1]}: it is cancelled; cancel applies to pending, failed or unknown replies"
        in (refused.stderr)
    )
    states = {r["id"]: r["state"] for r in json.loads(emailops(env, "outbox", "list", "--json").stdout)}
    assert states == {ids[0]: "pending", ids[1]: "cancelled"}
    plain = emailops(env, "outbox")
    assert plain.returncode == 0 and "person1@example.org" in plain.stdout


def test_reindex_refuses_while_a_daemon_holds_the_index(
    env: dict[str, str], dovecot: LocalDovecot, tmp_path: Path
) -> None:
    (tmp_path / "rules.toml").write_text(
        '[[rules]]\nname = "ack"\n[rules.match]\nsubject = "help"\n[rules.reply]\ntemplate = "Got it"\n'
    )
    with (tmp_path / "daemon.log").open("w") as output:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, stdout=output, stderr=output
        )
    try:
        database = tmp_path / "emailops.db"

        def indexed() -> list[tuple[object, ...]]:
            with sqlite3.connect(database) as db:
                return db.execute("SELECT uidvalidity, uid FROM messages ORDER BY uid").fetchall()

        def leased() -> bool:
            try:
                with sqlite3.connect(database) as db:
                    return bool(db.execute("SELECT 1 FROM folders WHERE lease_owner IS NOT NULL").fetchall())
            except sqlite3.OperationalError:  # no index yet
                return False

        deadline = time.monotonic() + 60
        while not (leased() and len(indexed()) == 2):
            assert daemon.poll() is None and time.monotonic() < deadline, (
                tmp_path / "daemon.log"
            ).read_text()
            time.sleep(0.2)
        before = indexed()

        refused = emailops(env, "reindex")
        assert refused.returncode == 1
        (line,) = refused.stderr.splitlines()
        assert line.startswith("emailops reindex: refused, nothing changed: a running daemon holds the index")
        worker = int(line.split("(pid ", 1)[1].split()[0])
        assert worker in _children(daemon.pid)
        assert f"(pid {worker} on host {socket.gethostname()})" in line and "folder 'INBOX'" in line
        assert f"stop the daemon first (`docker compose stop app`, or `kill -TERM {daemon.pid}`" in line
        assert refused.stdout == ""
        assert indexed() == before

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        rebuilt = emailops(env, "reindex")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "INBOX: 2 new" in rebuilt.stdout
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_utf16_subject_without_a_byte_order_mark_is_found(
    env: dict[str, str], dovecot: LocalDovecot
) -> None:
    """As SpamAssassin's t/data/spam/utf16.eml writes it: ``=?utf-16?b?RABlAHMA...?=``."""
    subject = base64.b64encode("Design your future".encode("utf-16-le")).decode()
    dovecot.append(
        ALICE,
        "INBOX",
        f"From: a@example.org\r\nTo: {ALICE}\r\nSubject: =?utf-16?b?{subject}?=\r\n"
        "Message-ID: <utf16@example.org>\r\n\r\nbody\r\n".encode(),
    )
    assert emailops(env, "sync", "--once").returncode == 0
    (hit,) = json.loads(emailops(env, "search", "--json", "design").stdout)
    assert hit["subject"] == "Design your future"


def test_outbox_retry_and_cancel_leave_another_accounts_replies_alone(env: dict[str, str]) -> None:
    """The index may hold several accounts' replies; this command's account is the one configured."""
    from sqlalchemy import update

    from emailops.replies import outbox
    from emailops.store.schema import outbox as outbox_table
    from tests import test_outbox
    from tests.index_helpers import index_engine

    engine = index_engine(env["INDEX_DB_URL"])
    theirs = test_outbox.add(engine, "<theirs@example.org>")  # of an account this command is not
    with engine.begin() as conn:
        conn.execute(update(outbox_table).values(state="failed", last_error="550"))
    engine.dispose()

    for action in ("retry", "cancel"):
        refused = emailops(env, "outbox", action, str(theirs))
        assert refused.returncode == 1
        assert f"not changed: reply {theirs}: no such reply of {ALICE}@127.0.0.1" in refused.stderr
    engine = index_engine(env["INDEX_DB_URL"])
    with engine.connect() as conn:
        row = outbox.get_reply(conn, theirs)
    engine.dispose()
    assert row is not None and (row.account, row.state, row.attempts) == (test_outbox.ACCOUNT, "failed", 0)
    assert row.updated_at == test_outbox.T0
