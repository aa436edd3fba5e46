"""``python -m prod.healthcheck``: the healthy line exactly, each unhealthy cause, speed, no secret.

The process checks build the supervisor's state file by hand (pids of this test process for the
live ones, a reaped child's pid for the dead ones); the supervision tests check it end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emailops.store import account_state
from emailops.store.account_state import Event
from prod.heartbeat import SupervisorState, WorkerState, write_state
from prod.worker_status import FolderReport, SmtpReport, WaitReport, WorkerStatus, write_status
from tests.index_helpers import index_engine
from tests.oauth2_helpers import TOKEN_KEY
from tests.shell_workers import PASSWORD, healthy_line, run_healthcheck, shell_env

pytestmark = pytest.mark.timeout(60)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_state(
    env: dict[str, str], *, age: float = 0.0, supervisor_pid: int | None = None, workers=None
) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    if workers is None:
        workers = [(n, os.getpid(), now) for n in range(1, int(env["WORKERS"]) + 1)]
    state_dir = Path(env["STATE_DIR"])
    state_dir.mkdir(parents=True, exist_ok=True)
    write_state(
        state_dir,
        SupervisorState(
            pid=supervisor_pid or os.getpid(),
            heartbeat=now - age,
            expected_workers=int(env["WORKERS"]),
            started_at=now - 60,
            workers=[
                WorkerState(worker=n, pid=pid, state="RUNNING", last_heartbeat=hb) for n, pid, hb in workers
            ],
        ),
    )


def _assert_age_message(error: str, template: str, seconds: int) -> None:
    """``error`` is ``template`` with the age in seconds at ``{}``: ``seconds`` as the test wrote it,
    plus the time the healthcheck process took to start (rounded: a busy machine adds a second)."""
    prefix, _, suffix = template.partition("{}")
    assert error.startswith(prefix) and error.endswith(suffix), error
    age = int(error[len(prefix) : len(error) - len(suffix)])
    assert seconds <= age < seconds + 10, error


def _unhealthy(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    output, code, _ = run_healthcheck(tmp_path, env)
    assert code == 1, output
    assert output.endswith("\n") and output.count("\n") == 1
    answer = json.loads(output)
    assert list(answer) == ["ok", "error", "error_type"]
    assert answer["ok"] is False
    assert PASSWORD not in output
    return answer


def test_healthy_output_is_exact_and_fast(tmp_path: Path) -> None:
    env = shell_env(tmp_path, ENV="production", LOG_LEVEL="WARNING", WORKERS="2")
    _write_state(env)
    timings = []
    for _ in range(3):
        started = time.monotonic()
        output, code, cpu_seconds = run_healthcheck(tmp_path, env)
        timings.append((time.monotonic() - started, cpu_seconds))
        assert (output, code) == (healthy_line(env), 0)
    assert output == '{"ok": true, "env": "production", "log_level": "WARNING", "workers": 2}\n'
    # CPU time, not wall time: the machine running the tests may be busy with other work.
    assert min(cpu for _, cpu in timings) < 1.0, f"wall / CPU seconds: {timings}"


def test_verbose_adds_detail(tmp_path: Path) -> None:
    env = shell_env(tmp_path)
    _write_state(env)
    output, code, _ = run_healthcheck(tmp_path, env, "--verbose")
    answer = json.loads(output)
    assert code == 0 and answer["ok"] is True
    assert answer["detail"]["supervisor"]["pid"] == os.getpid()
    assert answer["detail"]["workers"][0]["live"] is True


def test_the_healthcheck_imports_little(tmp_path: Path) -> None:
    env = shell_env(tmp_path)
    _write_state(env)
    code = (
        "import sys, prod.healthcheck; "
        "assert prod.healthcheck.check()[1] == 0; "
        "heavy = ('structlog', 'sentry_sdk', 'imapclient', 'prod.logging_setup'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"EMAIL_PASSWORD": None}, "EMAIL_PASSWORD"),
        ({"EMAIL_IMAP_HOST": None}, "EMAIL_IMAP_HOST"),
        ({"EMAIL_SMTP_HOST": None}, "EMAIL_SMTP_HOST"),
        ({"EMAIL_USERNAME": None}, "EMAIL_USERNAME"),
        ({"EMAIL_IMAP_PORT": "70000"}, "EMAIL_IMAP_PORT"),
        ({"EMAIL_SMTP_PORT": "0"}, "EMAIL_SMTP_PORT"),
        ({"WORKERS": "0"}, "WORKERS"),
        ({"LOG_LEVEL": "VERBOSE"}, "LOG_LEVEL"),
        ({"INDEX_DB_URL": "not a url"}, "INDEX_DB_URL"),
        ({"INDEX_DB_URL": "mysql://u:p@h/db"}, "INDEX_DB_URL"),
    ],
)
def test_invalid_settings_name_the_variable(
    tmp_path: Path, overrides: dict[str, str | None], variable: str
) -> None:
    env = shell_env(tmp_path, **overrides)  # type: ignore[arg-type]
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "ConfigError"
    assert variable in answer["error"]


def test_state_dir_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = shell_env(tmp_path, STATE_DIR=str(blocker / "state"))
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "StateDirNotWritable"
    assert "STATE_DIR" in answer["error"]


def test_sqlite_directory_missing_is_unreachable(tmp_path: Path) -> None:
    env = shell_env(tmp_path, INDEX_DB_URL=f"sqlite:///{tmp_path}/missing/emailops.db")
    _write_state(env)
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "DatabaseUnreachable"
    assert "INDEX_DB_URL" in answer["error"]


def test_sqlite_file_that_is_not_a_database_is_unreachable(tmp_path: Path) -> None:
    (tmp_path / "emailops.db").write_bytes(b"this is not a database file" * 100)
    env = shell_env(tmp_path)
    _write_state(env)
    assert _unhealthy(tmp_path, env)["error_type"] == "DatabaseUnreachable"


def test_sqlite_missing_file_in_existing_directory_is_fine_and_not_created(tmp_path: Path) -> None:
    env = shell_env(tmp_path)
    _write_state(env)
    output, code, _ = run_healthcheck(tmp_path, env)
    assert code == 0, output
    assert not (tmp_path / "emailops.db").exists()


def test_postgres_unreachable_without_printing_the_password(tmp_path: Path) -> None:
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = shell_env(
        tmp_path, INDEX_DB_URL=f"postgresql+psycopg://bob:{PASSWORD}@127.0.0.1:{closed_port}/test"
    )
    _write_state(env)
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "DatabaseUnreachable"


@pytest.mark.postgres
@pytest.mark.postgres
def test_postgres_reachable(tmp_path: Path, pg_url: str) -> None:
    # pg_url: a fresh database on the server the other tests use (EMAILOPS_TEST_PG_ADMIN).
    env = shell_env(tmp_path, INDEX_DB_URL=pg_url)
    _write_state(env)
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)


def test_supervisor_not_running_without_state(tmp_path: Path) -> None:
    env = shell_env(tmp_path)
    (tmp_path / "state").mkdir()
    assert _unhealthy(tmp_path, env)["error_type"] == "SupervisorNotRunning"


def test_supervisor_not_running_when_its_pid_is_gone(tmp_path: Path) -> None:
    env = shell_env(tmp_path)
    _write_state(env, supervisor_pid=_dead_pid())
    assert _unhealthy(tmp_path, env)["error_type"] == "SupervisorNotRunning"


def test_supervisor_stale(tmp_path: Path) -> None:
    env = shell_env(tmp_path)
    _write_state(env, age=60)
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "SupervisorStale"


@pytest.mark.parametrize("cause", ["dead pid", "stale heartbeat", "not booted", "missing"])
def test_fewer_live_workers_than_expected(tmp_path: Path, cause: str) -> None:
    env = shell_env(tmp_path, WORKERS="2", HEARTBEAT_TIMEOUT_SECONDS="5")
    now = time.time()
    second = {
        "dead pid": [(2, _dead_pid(), now)],
        "stale heartbeat": [(2, os.getpid(), now - 30)],
        "not booted": [(2, os.getpid(), 0.0)],
        "missing": [],
    }[cause]
    _write_state(env, workers=[(1, os.getpid(), now), *second])
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "WorkersMissing"
    assert answer["error"] == "1 of 2 workers are live"


def _write_worker_status(
    env: dict[str, str],
    worker: int,
    *folders: FolderReport,
    started_ago: float,
    smtp: SmtpReport | None = None,
) -> None:
    now = time.time()
    write_status(
        Path(env["STATE_DIR"]),
        WorkerStatus(
            worker=worker,
            pid=os.getpid(),
            started_at=now - started_ago,
            updated_at=now,
            folders=list(folders),
            smtp=smtp,
        ),
    )


def test_a_folder_synced_within_the_limit_is_healthy_and_shown_by_verbose(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2", HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5")
    _write_state(env)
    now = time.time()
    failed = FolderReport("Old", None, "folder_missing", "folder 'Old' does not exist", now - 100)
    _write_worker_status(env, 1, FolderReport("INBOX", now - 50), failed, started_ago=600)
    _write_worker_status(env, 2, started_ago=600)  # holds no folder
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)
    answer = json.loads(run_healthcheck(tmp_path, env, "--verbose")[0])
    first, second = answer["detail"]["workers"]
    assert first["uptime_seconds"] >= 600 and second["folders"] == []
    inbox, old = first["folders"]
    assert inbox["folder"] == "INBOX" and 50 <= inbox["last_sync_age_seconds"] < 60
    assert inbox["last_error"] is None
    assert old["last_sync_age_seconds"] is None
    assert old["last_error"]["error_type"] == "ImapFolderMissing" and "'Old'" in old["last_error"]["error"]


@pytest.mark.parametrize(
    ("kind", "error_type"),
    [
        ("connection", "ImapServerUnreachable"),
        ("auth", "ImapSignInRefused"),
        ("folder_missing", "ImapFolderMissing"),
        ("tls", "ImapTlsFailed"),
        ("too_many_connections", "ImapTooManyConnections"),
    ],
)
def test_no_folder_synced_within_the_limit_names_the_last_error(
    tmp_path: Path, kind: str, error_type: str
) -> None:
    env = shell_env(tmp_path, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5")
    _write_state(env)
    now = time.time()
    earlier = FolderReport("Archive", now - 300, "connection", "cannot connect", now - 200)
    latest = FolderReport("INBOX", now - 90, kind, f"{kind} happened", now - 10)
    _write_worker_status(env, 1, earlier, latest, started_ago=600)
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == error_type
    _assert_age_message(
        answer["error"],
        f"no watched folder has synced for {{}} s (limit 60 s); last error (INBOX): {kind} happened",
        90,
    )


def test_the_limit_is_at_least_two_poll_intervals(tmp_path: Path) -> None:
    env = shell_env(tmp_path, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="120")
    _write_state(env)
    _write_worker_status(env, 1, FolderReport("INBOX", time.time() - 200), started_ago=600)
    assert run_healthcheck(tmp_path, env)[1] == 0
    _write_worker_status(env, 1, FolderReport("INBOX", time.time() - 250), started_ago=600)
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "FolderSyncStale"
    _assert_age_message(answer["error"], "no watched folder has synced for {} s (limit 240 s)", 250)


def test_without_any_sync_the_time_counts_from_the_oldest_worker_start(tmp_path: Path) -> None:
    env = shell_env(tmp_path, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5")
    _write_state(env)
    refused = FolderReport("INBOX", None, "auth", "AUTHENTICATIONFAILED", time.time() - 1)
    _write_worker_status(env, 1, refused, started_ago=30)
    assert run_healthcheck(tmp_path, env)[1] == 0  # still within the first minute
    _write_worker_status(env, 1, refused, started_ago=61)
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "ImapSignInRefused"
    _assert_age_message(
        answer["error"],
        "no watched folder has synced since the workers started for {} s (limit 60 s); "
        "last error (INBOX): AUTHENTICATIONFAILED",
        61,
    )


def test_a_status_file_of_another_process_is_ignored(tmp_path: Path) -> None:
    env = shell_env(tmp_path, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5")
    _write_state(env)  # worker 1 is this process
    # A former worker 1's file, left behind: not the current worker's view, so not judged.
    stale = WorkerStatus(
        worker=1, pid=_dead_pid(), started_at=0.0, updated_at=0.0, folders=[FolderReport("INBOX", 0.0)]
    )
    write_status(Path(env["STATE_DIR"]), stale)
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)


REFUSED = (
    "authentication failed: 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
)


def _refused(since_ago: float, *, signed_in_ago: float | None = None) -> SmtpReport:
    now = time.time()
    signed_in = None if signed_in_ago is None else now - signed_in_ago
    return SmtpReport(signed_in_at=signed_in, refused_since=now - since_ago, error=REFUSED, error_at=now - 1)


def test_smtp_refusing_the_sign_in_longer_than_the_limit_is_unhealthy(tmp_path: Path) -> None:
    env = shell_env(tmp_path, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5")
    _write_state(env)
    inbox = FolderReport("INBOX", time.time() - 5)
    _write_worker_status(env, 1, inbox, started_ago=600, smtp=_refused(50, signed_in_ago=300))
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)  # refused, but not yet for the limit
    _write_worker_status(env, 1, inbox, started_ago=600, smtp=_refused(70, signed_in_ago=300))
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "SmtpSignInRefused"
    _assert_age_message(
        answer["error"],
        "the SMTP server 127.0.0.1:1025 has refused the account's sign-in for {} s (limit 60 s), so no "
        f"reply is sent; last error: {REFUSED}; fix: check EMAIL_USERNAME/EMAIL_PASSWORD (Microsoft 365: "
        "enable Authenticated SMTP for the mailbox); healthy again once a reply is sent",
        70,
    )
    smtp = json.loads(run_healthcheck(tmp_path, env, "--verbose")[0])["detail"]["workers"][0]["smtp"]
    assert 300 <= smtp["last_sign_in_age_seconds"] < 310 and 70 <= smtp["refused_for_seconds"] < 80
    assert smtp["last_error"]["error_type"] == "SmtpSignInRefused" and smtp["last_error"]["error"] == REFUSED


def test_a_sign_in_by_another_worker_since_the_refusal_is_healthy(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2", HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5")
    _write_state(env)
    _write_worker_status(env, 1, started_ago=600, smtp=_refused(200))
    _write_worker_status(env, 2, started_ago=600, smtp=SmtpReport(signed_in_at=time.time() - 100))
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)
    # Worker 2 refused too since then: the refusal is continuous from its start, 90 s ago.
    _write_worker_status(env, 2, started_ago=600, smtp=_refused(90, signed_in_ago=100))
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "SmtpSignInRefused"
    assert "has refused the account's sign-in for 9" in answer["error"], answer


def test_smtp_unused_or_signed_in_is_healthy(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2", HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5")
    _write_state(env)
    _write_worker_status(env, 1, started_ago=600, smtp=SmtpReport())  # no reply was due
    # Refused long ago, signed in since: the last error is shown, no longer current.
    past = SmtpReport(signed_in_at=time.time() - 10, error=REFUSED, error_at=time.time() - 500)
    _write_worker_status(env, 2, started_ago=600, smtp=past)
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)
    first, second = json.loads(run_healthcheck(tmp_path, env, "--verbose")[0])["detail"]["workers"]
    assert first["smtp"] == {
        "last_sign_in_age_seconds": None,
        "refused_for_seconds": None,
        "last_error": None,
    }
    assert second["smtp"]["refused_for_seconds"] is None and second["smtp"]["last_error"]["error"] == REFUSED


def test_an_smtp_refusal_with_oauth2_names_the_oauth2_fix(tmp_path: Path) -> None:
    env = shell_env(
        tmp_path,
        HEALTH_MAX_SYNC_AGE_SECONDS="60",
        POLL_INTERVAL_SECONDS="5",
        EMAIL_PASSWORD=None,
        EMAIL_AUTH="oauth2",
        EMAIL_OAUTH2_PROVIDER="microsoft",
        EMAIL_OAUTH2_CLIENT_ID="11111111-2222-3333-4444-555555555555",
        EMAIL_OAUTH2_TOKEN_KEY=TOKEN_KEY,
    )
    _write_state(env)
    _write_worker_status(env, 1, started_ago=600, smtp=_refused(70))
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "SmtpSignInRefused"
    assert answer["error"].endswith(
        "fix: allow the app to send as EMAIL_USERNAME (Microsoft 365: enable Authenticated SMTP for the "
        "mailbox; the SMTP scope in EMAIL_OAUTH2_SCOPES), or sign in again with `emailops auth login`; "
        "healthy again once a reply is sent"
    ), answer


def test_a_server_not_answering_for_longer_than_the_timeout_is_named(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2", EMAIL_TIMEOUT_SECONDS="30")
    _write_state(env)
    now = time.time()
    state_dir = Path(env["STATE_DIR"])

    def status(worker: int, silent_for: float) -> WorkerStatus:
        silent = WaitReport("imap", "imap.example.com:993", now - silent_for)
        return WorkerStatus(
            worker=worker,
            pid=os.getpid(),
            started_at=now - 600,
            updated_at=now,
            folders=[FolderReport("INBOX", now - 5)],
            waiting=silent,
            not_answering=[silent],
        )

    # One timeout, not yet longer than EMAIL_TIMEOUT_SECONDS: healthy, and shown by --verbose.
    write_status(state_dir, status(1, 25))
    assert run_healthcheck(tmp_path, env)[:2] == (healthy_line(env), 0)
    first = json.loads(run_healthcheck(tmp_path, env, "--verbose")[0])["detail"]["workers"][0]
    assert (
        first["waiting"]["endpoint"] == "imap.example.com:993" and 25 <= first["waiting"]["age_seconds"] < 35
    )
    assert [w["endpoint"] for w in first["not_answering"]] == ["imap.example.com:993"]

    _write_state(env)  # fresh heartbeats (HEARTBEAT_TIMEOUT_SECONDS=5): a slow machine took them
    write_status(state_dir, status(1, 95))
    write_status(state_dir, status(2, 40))
    answer = _unhealthy(tmp_path, env)
    assert answer["error_type"] == "ImapServerNotAnswering"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 95))
    _assert_age_message(
        answer["error"],
        f"the IMAP server imap.example.com:993 has not answered since {since} ({{}} s; each call gives "
        "up after EMAIL_TIMEOUT_SECONDS=30); worker(s) 1, 2 wait for it",
        95,
    )


# -- accounts (account_state) ----------------------------------------------------------------------


def _record_account(url: str, account: str, *events: tuple[Event, str | None, str | None]) -> None:
    engine = index_engine(url)
    try:
        with engine.begin() as conn:
            for event, kind, error in events:
                account_state.record(conn, account, event, error_kind=kind, error=error)
    finally:
        engine.dispose()


def test_one_account_whose_sign_in_is_refused_is_no_reason_to_restart(tmp_path: Path, db_url: str) -> None:
    """A restart does not fix a refused password: healthy (the processes are well), and
    ``--verbose`` lists the account with its state, error and next attempt."""
    env = shell_env(
        tmp_path, INDEX_DB_URL=db_url, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5"
    )
    refusal = "[AUTHENTICATIONFAILED] Authentication failed."
    _record_account(db_url, "bob@example.test", (Event.REFUSED, "auth", refusal))
    _write_state(env)
    now = time.time()
    _write_worker_status(env, 1, FolderReport("INBOX", None, "auth", refusal, now - 10), started_ago=600)
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)
    answer = json.loads(run_healthcheck(tmp_path, env, "--verbose")[0])
    assert answer["ok"] is True
    [shown] = answer["detail"]["accounts"]
    assert shown["account"] == "bob@example.test" and shown["metrics_label"].startswith("acct-")
    assert (shown["state"], shown["error_kind"], shown["error"], shown["failures"]) == (
        "auth_failed",
        "auth",
        refusal,
        1,
    )
    assert 800 <= shown["next_attempt_in_seconds"] <= 1800 and shown["last_sync_age_seconds"] is None


def test_an_account_in_backoff_that_has_not_synced_is_unhealthy(tmp_path: Path, db_url: str) -> None:
    """A server that is down or does not answer may come back with a restart elsewhere (a network
    namespace, DNS): the container stays unhealthy as before, and names the error."""
    env = shell_env(
        tmp_path, INDEX_DB_URL=db_url, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5"
    )
    _record_account(db_url, "bob@example.test", (Event.FAILED, "connection", "cannot connect: timed out"))
    _write_state(env)
    now = time.time()
    failing = FolderReport("INBOX", now - 90, "connection", "cannot connect: timed out", now - 10)
    _write_worker_status(env, 1, failing, started_ago=600)
    assert _unhealthy(tmp_path, env)["error_type"] == "ImapServerUnreachable"
    shown = json.loads(run_healthcheck(tmp_path, env, "--verbose")[0])["detail"]["accounts"]
    assert [(row["state"], row["failures"]) for row in shown] == [("backoff", 1)]


def test_one_account_syncing_keeps_the_container_healthy(tmp_path: Path, db_url: str) -> None:
    """Of two accounts, one refused and one synced by the database's record: healthy, and only
    the account that is not ok is listed."""
    env = shell_env(
        tmp_path, INDEX_DB_URL=db_url, HEALTH_MAX_SYNC_AGE_SECONDS="60", POLL_INTERVAL_SECONDS="5"
    )
    _record_account(db_url, "support", (Event.SYNCED, None, None))
    _record_account(db_url, "sales", (Event.FAILED, "connection", "reset"), (Event.FAILED, "tls", "bad cert"))
    _write_state(env)
    now = time.time()
    _write_worker_status(
        env, 1, FolderReport("INBOX", now - 90, "tls", "bad cert", now - 10), started_ago=600
    )
    output, code, _ = run_healthcheck(tmp_path, env)
    assert (output, code) == (healthy_line(env), 0)
    shown = json.loads(run_healthcheck(tmp_path, env, "--verbose")[0])["detail"]["accounts"]
    assert [(row["account"], row["metrics_label"], row["state"]) for row in shown] == [
        ("sales", "sales", "backoff")
    ]
