"""The daemon as operators run it (python -m prod.run, WORKERS=2) against a real Dovecot and SMTP relay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from prod.heartbeat import SupervisorState, state_path
from tests.index_helpers import ALICE, daemon_env, first_synced, message

REPO = Path(__file__).resolve().parents[1]
LOG_KEYS = {"ts", "level", "logger", "message", "pid", "thread"}
RULES = (
    '[[rules]]\nname = "ack"\n[rules.match]\nsubject = "help"\n[rules.reply]\ntemplate = "Got {subject}"\n'
)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - started


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prod.healthcheck"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def supervisor_state(data: Path) -> SupervisorState | None:
    try:
        return SupervisorState.from_json(state_path(data / "state").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "rules.toml").write_text(RULES)
    return tmp_path


@pytest.fixture
def daemon(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, data: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    env = daemon_env(
        dovecot,
        data,
        WORKERS="2",
        LOG_LEVEL="DEBUG",
        LOG_FILE_ENABLED="true",
        EMAIL_SMTP_PORT=str(smtp_relay.port),
        SHUTDOWN_TIMEOUT_SECONDS="10",
        HEARTBEAT_TIMEOUT_SECONDS="20",
    )
    # Files, not pipes: at DEBUG the daemon writes more than a pipe holds while nobody reads it.
    with (data / "stdout.log").open("w") as stdout, (data / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, stdout=stdout, stderr=stderr
        )
    yield process, env
    if process.poll() is None:
        process.kill()
        process.wait()


def test_workers_supervised_healthy_indexing_replying_and_secret_free(
    daemon: tuple[subprocess.Popen[bytes], dict[str, str]],
    dovecot: LocalDovecot,
    smtp_relay: LocalSmtpRelay,
    data: Path,
) -> None:
    process, env = daemon
    password = env["EMAIL_PASSWORD"]
    wait_for(lambda: healthcheck(env).returncode == 0, 30, "healthy")
    healthy = healthcheck(env)
    assert healthy.stdout.strip() == '{"ok": true, "env": "test", "log_level": "DEBUG", "workers": 2}'

    # New mail is indexed and answered by whichever worker holds the folder.
    wait_for(lambda: first_synced(env["INDEX_DB_URL"]), 30, "the first sync: new mail from now on")
    dovecot.deliver(ALICE, message(1, subject="help please", body="wombat"))
    wait_for(lambda: len(smtp_relay.accepted) == 1, 20, "reply sent")

    # kill -9 of a worker: replaced, healthy again.
    state = supervisor_state(data)
    assert state is not None and len(state.workers) == 2
    victim = state.workers[0].pid
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        s = supervisor_state(data)
        return s is not None and victim not in {w.pid for w in s.workers} and healthcheck(env).returncode == 0

    wait_for(replaced, 30, "worker replaced and healthy")
    dovecot.deliver(ALICE, message(2, subject="help again", body="quokka"))
    wait_for(lambda: len(smtp_relay.accepted) == 2, 30, "second reply after the restart")

    # SIGTERM: a clean exit within 20 s.
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)
    stdout, stderr = (data / "stdout.log").read_text(), (data / "stderr.log").read_text()
    assert process.returncode == 0
    assert time.monotonic() - started < 20
    assert healthcheck(env).returncode == 1

    log_file = (data / "logs" / "app.log").read_text()
    for name, text in (("stdout", stdout), ("log file", log_file)):
        lines = text.splitlines()
        assert lines, name
        for line in lines:
            record = json.loads(line)
            assert set(record) >= LOG_KEYS, (name, line)
    assert '"level":"DEBUG"' in log_file and '"component":"imap"' in log_file
    for name, text in (
        ("stdout", stdout),
        ("stderr", stderr),
        ("log file", log_file),
        ("health", healthy.stdout),
    ):
        assert password not in text, name
    assert len(smtp_relay.accepted) == 2  # nothing answered twice across the worker restart


def test_without_password_start_fails_naming_it_and_unhealthy(dovecot: LocalDovecot, data: Path) -> None:
    env = daemon_env(dovecot, data)
    del env["EMAIL_PASSWORD"]
    result = subprocess.run(
        [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78 and "EMAIL_PASSWORD" in result.stdout + result.stderr
    health = healthcheck(env)
    report = json.loads(health.stdout)
    assert health.returncode == 1 and report["ok"] is False
    assert "EMAIL_PASSWORD" in report["error"] and report["error_type"]


def test_a_broken_rules_file_is_reported_at_start_not_at_the_first_new_mail(
    dovecot: LocalDovecot, data: Path
) -> None:
    (data / "rules.toml").write_text('[[rules]]\nname = "ack"\n[rules.match\n')
    env = daemon_env(dovecot, data, LOG_FILE_ENABLED="true")
    with (data / "stdout.log").open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT
        )
    try:

        def broken_rules_told() -> bool:
            for line in (data / "stdout.log").read_text().splitlines():
                record = json.loads(line)
                if record["message"] == "rules file invalid; keeping the previous rules":
                    assert record["level"] == "ERROR" and record["component"] == "rules"
                    assert "TOML syntax error" in record["error"] and record["rules_in_force"] == 0
                    return True
            return False

        wait_for(broken_rules_told, 20, "the broken rules file in the log")  # no mail was delivered
        assert process.poll() is None  # indexing goes on without rules
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
