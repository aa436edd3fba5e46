"""RUNBOOK.md's commands that need no Docker engine, run verbatim against a real daemon.

A LocalDovecot and an SMTP relay stand in for the mail provider; ``python -m prod.run`` runs in a
project folder whose ``data/`` holds everything, as the runbook's relative paths expect. Each
command string below must appear in RUNBOOK.md word for word (``test_commands_are_in_runbook``),
so the runbook cannot drift from what is tested.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import emailops
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from tests.shell_workers import wait_until

REPO = Path(__file__).resolve().parent.parent
RUNBOOK = (REPO / "RUNBOOK.md").read_text()
USER = "alice@example.test"
PASSWORD = "alice-pw"

SQLITE_BACKUP = 'sqlite3 data/emailops.db ".backup data/emailops-backup.db"'
EMAILOPS_BACKUP = "python -m emailops backup data/emailops-backup.db"
INTEGRITY_CHECK = 'sqlite3 data/emailops.db "PRAGMA integrity_check;"'
VACUUM = 'sqlite3 data/emailops.db "VACUUM;"'
RESTORE = [
    "rm -f data/emailops.db-wal data/emailops.db-shm",
    "cp data/emailops-backup.db data/emailops.db",
]
DELETE_INDEX = "rm -f data/emailops.db data/emailops.db-wal data/emailops.db-shm"
REINDEX = "python -m emailops reindex"
HEALTHCHECK = "python -m prod.healthcheck"
HEALTHY_OUTPUT = '{"ok": true, "env": "production", "log_level": "INFO", "workers": 1}'
GREP_ERRORS = 'grep \'"level":"ERROR"\' data/logs/app.log'
GREP_INDEX = 'grep \'"component":"index"\' data/logs/app.log'
GREP_RULES = 'grep \'"component":"rules"\' data/logs/app.log'
GREP_SMTP = 'grep \'"component":"smtp"\' data/logs/app.log'
SETTINGS_LINE = (
    'python -c "from prod.runtime_settings import RuntimeSettings; '
    'print(RuntimeSettings.from_env().index_db_url)"'
)
VERSION_LINE = 'python -c "import emailops; print(emailops.__version__)"'
CHECK_CONFIG = "python -m emailops check-config"
TAR_BACKUP = "tar czf backup-$(date +%Y%m%d).tar.gz data/"

COMMANDS = [
    SQLITE_BACKUP, EMAILOPS_BACKUP, INTEGRITY_CHECK, VACUUM, *RESTORE, DELETE_INDEX, REINDEX,
    HEALTHCHECK, HEALTHY_OUTPUT, GREP_ERRORS, GREP_INDEX, GREP_RULES, GREP_SMTP, SETTINGS_LINE,
    VERSION_LINE, CHECK_CONFIG, TAR_BACKUP, "python -m prod.run", "bin/run",
]  # fmt: skip


def test_commands_are_in_runbook() -> None:
    missing = [command for command in COMMANDS if command not in RUNBOOK]
    assert missing == []


def _message(number: int, subject: str, sender: str = "carol@example.org") -> bytes:
    return (
        f"From: Sender {number} <{sender}>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
        f"Message-ID: <runbook-{number}@example.org>\r\nDate: Mon, 03 Nov 2025 09:00:00 +0000\r\n\r\n"
        f"Body of message {number}, about marmalade.\r\n"
    ).encode()


class Project:
    """A project folder with ``data/``, the daemon's environment, and the daemon when running."""

    def __init__(self, root: Path, dovecot: LocalDovecot, relay: LocalSmtpRelay) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir()
        self.db = self.data / "emailops.db"
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("EMAIL_")}
        self.env.update(
            PYTHONPATH=str(REPO),
            LOG_FILE_PATH=str(self.data / "logs" / "app.log"),
            STATE_DIR=str(self.data / "state"),
            CACHE_DIR=str(self.data / "cache"),
            INDEX_DB_URL=f"sqlite:///{self.db}",
            EMAIL_IMAP_HOST=dovecot.host,
            EMAIL_IMAP_PORT=str(dovecot.imap_port),
            EMAIL_IMAP_SECURITY="none",
            EMAIL_SMTP_HOST=relay.host,
            EMAIL_SMTP_PORT=str(relay.port),
            EMAIL_SMTP_SECURITY="none",
            EMAIL_USERNAME=USER,
            EMAIL_PASSWORD=PASSWORD,
            RULES_FILE=str(REPO / "examples" / "rules.toml"),
            POLL_INTERVAL_SECONDS="1",
        )
        for name in ("ENV", "LOG_LEVEL", "WORKERS", "LOG_FILE_ENABLED", "SENTRY_DSN"):
            self.env.pop(name, None)
        self.daemon: subprocess.Popen[bytes] | None = None

    def sh(self, command: str, *, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["bash", "-c", command], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=120
        )
        if ok:
            assert result.returncode == 0, f"{command}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def start(self) -> None:
        stdout = (self.root / "daemon.out").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "prod.run"], cwd=self.root, env=self.env, stdout=stdout, stderr=stdout
        )
        stdout.close()

    def stop(self) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        code = self.daemon.wait(timeout=30)
        self.daemon = None
        return code

    def rows(self) -> list[tuple[int, int, int]]:
        """(folder_id, uidvalidity, uid) of every indexed, not expunged message."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(
                "SELECT folder_id, uidvalidity, uid FROM messages WHERE expunged_at IS NULL"
            ).fetchall()
        finally:
            conn.close()

    def wait_for_messages(self, count: int, timeout: float = 30.0) -> list[tuple[int, int, int]]:
        deadline = time.monotonic() + timeout
        rows: list[tuple[int, int, int]] = []
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.daemon is not None:
                assert self.daemon.poll() is None, (self.root / "daemon.out").read_text()[-3000:]
            try:
                rows = self.rows()
            except sqlite3.DatabaseError as error:  # not created yet, or being created right now
                last_error = error
                rows = []
            if len(rows) >= count:
                return rows
            time.sleep(0.3)
        raise AssertionError(f"{len(rows)} of {count} messages indexed in {timeout} s ({last_error})")

    def rules_states(self) -> dict[str, str]:
        """Message-ID -> rules state of every indexed message."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return dict(conn.execute("SELECT message_id, rules_state FROM messages").fetchall())
        finally:
            conn.close()

    def wait_for_rules_done(self, *numbers: int) -> None:
        """Wait until the rules of messages ``numbers`` (``_message``'s) ran: a positive sign that a
        rules pass that would answer something twice has had its chance."""
        wanted = {f"<runbook-{number}@example.org>" for number in numbers}
        done = wait_until(
            lambda: all(self.rules_states().get(mid) == "done" for mid in wanted), timeout=30, interval=0.2
        )
        assert done, self.rules_states()

    def wait_for_log(self, command: str) -> None:
        """Wait until the runbook's grep ``command`` finds a line in the log file."""
        found = wait_until(lambda: self.sh(command, ok=False).returncode == 0, timeout=30, interval=0.2)
        assert found, command

    def wait_for_replies(self, relay: LocalSmtpRelay, count: int) -> None:
        try:
            relay.wait_for_accepted(count, timeout=30)
        except TimeoutError as error:
            log = (self.root / "daemon.out").read_text()[-6000:]
            raise AssertionError(f"{error}; the daemon's log ends:\n{log}") from None

    def wait_healthy(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            result = self.sh(HEALTHCHECK, ok=False)
            if result.returncode == 0 or time.monotonic() > deadline:
                return result.stdout.strip()
            time.sleep(0.5)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Project, LocalDovecot, LocalSmtpRelay]]:
    with (
        LocalDovecot({USER: PASSWORD}) as dovecot,
        LocalSmtpRelay(dovecot, {USER: PASSWORD}) as relay,
    ):
        for number in (1, 2, 3):
            dovecot.append(USER, "INBOX", _message(number, f"History {number}"))
        project = Project(tmp_path, dovecot, relay)
        try:
            yield project, dovecot, relay
        finally:
            if project.daemon is not None:
                project.daemon.kill()
                project.daemon.wait()


def _deliver_help_request(dovecot: LocalDovecot, number: int, sender: str) -> None:
    dovecot.deliver(USER, _message(number, f"help needed {number}", sender), mail_from=sender)


def test_backup_restore_and_rebuild(project: tuple[Project, LocalDovecot, LocalSmtpRelay]) -> None:
    p, dovecot, relay = project
    p.start()
    p.wait_for_messages(3)
    assert p.wait_healthy() == HEALTHY_OUTPUT

    # New mail is answered once.
    _deliver_help_request(dovecot, 4, "dave@example.org")
    p.wait_for_replies(relay, 1)

    # Both backups while the daemon runs, with WAL: consistent copies that pass the integrity check.
    assert (p.data / "emailops.db-wal").exists()
    p.sh(SQLITE_BACKUP)
    backup = p.data / "emailops-backup.db"
    with sqlite3.connect(backup) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (4,)
    second = p.sh(EMAILOPS_BACKUP.replace("emailops-backup.db", "emailops-backup-2.db"))
    assert "integrity ok" in second.stdout
    assert p.sh(INTEGRITY_CHECK).stdout.strip() == "ok"

    # After the backup, another request is answered; then the backup is restored.
    _deliver_help_request(dovecot, 5, "erin@example.org")
    p.wait_for_replies(relay, 2)
    assert p.stop() == 0
    for command in RESTORE:
        p.sh(command)
    assert p.sh(INTEGRITY_CHECK).stdout.strip() == "ok"

    # The daemon resumes from the backup: it indexes message 5 again and does not answer it again
    # (the mailbox keyword $AutoReplied says it was answered).
    p.start()
    rows = p.wait_for_messages(5)
    assert p.wait_healthy() == HEALTHY_OUTPUT
    _deliver_help_request(dovecot, 6, "frank@example.org")
    p.wait_for_replies(relay, 3)
    rows = p.wait_for_messages(6)
    # The rules of message 5 (restored) and 6 ran: had they answered 5 again, the relay would show it.
    p.wait_for_rules_done(5, 6)
    assert len(rows) == len(set(rows)) == 6, rows
    recipients = [message.rcpt_tos for message in relay.accepted]
    assert recipients == [("dave@example.org",), ("erin@example.org",), ("frank@example.org",)]
    assert p.stop() == 0

    # The index is deleted: reindex rebuilds it from IMAP and old mail is not answered.
    p.sh(DELETE_INDEX)
    assert not p.db.exists()
    rebuilt = p.sh(REINDEX)
    assert "total: 6 new messages indexed" in rebuilt.stdout
    p.start()
    assert p.wait_healthy() == HEALTHY_OUTPUT
    # A new request is answered: the rules have run since the start, so a rebuilt message that they
    # took for new mail (older, hence first in line) would have been answered by then too.
    _deliver_help_request(dovecot, 7, "gina@example.org")
    p.wait_for_replies(relay, 4)
    p.wait_for_rules_done(7)
    assert [message.rcpt_tos for message in relay.accepted][3:] == [("gina@example.org",)]
    assert sorted(p.rows()) == sorted(set(p.rows())) and len(p.rows()) == 7
    assert p.stop() == 0

    # Stopped: vacuum, and a tar of data/.
    p.sh(VACUUM)
    assert p.sh(INTEGRITY_CHECK).stdout.strip() == "ok"
    p.sh(TAR_BACKUP)
    assert list(p.root.glob("backup-*.tar.gz"))


def test_healthcheck_log_greps_and_settings_lines(
    project: tuple[Project, LocalDovecot, LocalSmtpRelay],
) -> None:
    p, dovecot, relay = project
    unhealthy = p.sh(HEALTHCHECK, ok=False)
    assert unhealthy.returncode == 1
    # Never started: data/state does not exist yet.
    assert json.loads(unhealthy.stdout)["error_type"] == "StateDirNotWritable"

    p.start()
    p.wait_for_messages(3)
    assert p.wait_healthy() == HEALTHY_OUTPUT
    _deliver_help_request(dovecot, 4, "dave@example.org")
    p.wait_for_replies(relay, 1)
    p.wait_for_log(GREP_SMTP)  # "reply sent" is logged once the relay's answer is recorded

    for command, component in ((GREP_INDEX, "index"), (GREP_RULES, "rules"), (GREP_SMTP, "smtp")):
        lines = p.sh(command).stdout.splitlines()
        assert lines, command
        assert {json.loads(line)["component"] for line in lines} == {component}
    no_errors = p.sh(GREP_ERRORS, ok=False)
    assert no_errors.returncode == 1, no_errors.stdout

    assert p.sh(SETTINGS_LINE).stdout.strip() == f"sqlite:///{p.db}"
    assert p.sh(VERSION_LINE).stdout.strip() == emailops.__version__
    config = p.sh(CHECK_CONFIG).stdout
    assert f"EMAIL_USERNAME={USER}" in config and PASSWORD not in config
    assert p.stop() == 0
    stopped = p.sh(HEALTHCHECK, ok=False)
    assert stopped.returncode == 1
    assert json.loads(stopped.stdout)["error_type"] == "SupervisorNotRunning"

    # A bad setting: the daemon refuses to start, and the runbook's ERROR grep names the variable.
    p.env["WORKERS"] = "0"
    refused = p.sh('python -m prod.run | grep \'"level":"ERROR"\'; exit ${PIPESTATUS[0]}', ok=False)
    assert refused.returncode == 78
    assert "invalid configuration: WORKERS" in json.loads(refused.stdout)["message"]


def test_the_compose_files_demo_commands_are_the_runbooks() -> None:
    # docker-compose.yml's header tells how to run the demo; the RUNBOOK's "Docker demo" must not
    # say otherwise (a missing rules file once left the compose demo answering nothing).
    header = (REPO / "docker-compose.yml").read_text().split("\nname:")[0]
    commands = [line.removeprefix("#").strip() for line in header.splitlines() if line.startswith("#   ")]
    assert len(commands) >= 3
    runbook_commands = [line.split("#")[0].strip() for line in RUNBOOK.splitlines()]
    missing = [command for command in commands if command not in runbook_commands]
    assert missing == []
