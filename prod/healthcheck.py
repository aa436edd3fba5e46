"""``python -m prod.healthcheck``: is this container doing its job? One JSON line, exit 0 or 1.

Healthy (exactly, values from the settings)::

    {"ok": true, "env": "production", "log_level": "INFO", "workers": 1}

Unhealthy, exit 1: ``{"ok": false, "error": "...", "error_type": "..."}``, checked in this order:

- ``ConfigError``: the settings are invalid (the error names the variable);
- ``StateDirNotWritable``: a file cannot be created in ``STATE_DIR``;
- ``DatabaseUnreachable``: reading ``INDEX_DB_URL`` fails (3 s timeout). For SQLite an
  existing file is opened read-only and must have a readable schema; a missing file whose
  directory exists is healthy (the workers create it), a missing directory is unreachable. The
  healthcheck never creates the database.
- ``SupervisorNotRunning``: no state file in ``STATE_DIR``, or its pid is gone;
- ``SupervisorStale``: the supervisor has not rewritten its state for ``SUPERVISOR_STALE_SECONDS``;
- ``WorkersMissing``: fewer live workers than ``WORKERS`` (live: pid exists and last heartbeat
  younger than ``HEARTBEAT_TIMEOUT_SECONDS``);
- ``ImapServerNotAnswering``: a worker's calls to the IMAP server have timed out for longer than
  ``EMAIL_TIMEOUT_SECONDS`` with no answer since (the server accepts connections but says nothing:
  frozen, overloaded, or a firewall dropping packets); ``error`` names the server (host:port) and
  since when. The workers wait for it and stay alive (``emailops.network_waits``);
- the work is not being done: the workers watch folders (their status files, ``prod.worker_status``)
  but none has synced for ``HEALTH_MAX_SYNC_AGE_SECONDS`` (at least two poll intervals; counted from
  the start of the oldest worker when none has synced yet). ``error_type`` says why, from the last
  IMAP error the workers saw: ``ImapServerUnreachable``, ``ImapSignInRefused``, ``ImapFolderMissing``,
  ``ImapTlsFailed``, ``ImapTooManyConnections``, or ``FolderSyncStale`` when no error explains it.
  Not when a restart would not help: some account has synced within the limit by its row in
  ``account_state`` (``emailops.store.account_state``), or every account there waits for the operator
  (``auth_failed``: its sign-in was refused; ``disabled``). One mailbox whose password is wrong is
  no reason to restart the container; ``--verbose`` and the metrics (``emailops_account_state``,
  alert ``EmailOpsAccountSignInRefused``) tell it;
- ``SmtpSignInRefused``: replies are due but the SMTP server has refused the account's sign-in
  (password or OAuth2) for ``HEALTH_MAX_SYNC_AGE_SECONDS`` (the same limit), with no successful
  sign-in by any worker since (the status files' ``smtp``). Healthy again once a reply is sent. A
  daemon with no reply due does not use SMTP, so it is never unhealthy for this.

No IMAP connection, no structlog/sentry import: it answers in a few hundred milliseconds.
``--verbose`` adds a ``detail`` object: the supervisor's pid, and for each worker its pid, state,
heartbeat age, uptime, each folder it watches with the age of its last sync and its last error,
the server it waits for now (``waiting``) and those not answering (``not_answering``), each with
its age, and its SMTP sign-ins (``smtp``: ages of the last sign-in and of the current refusal, last error);
and ``accounts``, each account that is not ``ok``: state, failures, last error and its kind, seconds
since its last sync and until its next attempt (by the database's clock), its metrics label.
Error texts go through the redactor with the password registered: no secret is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emailops.processes import pid_alive
from prod import heartbeat as state_file
from prod import worker_status
from prod.database_url import DatabaseUrl, parse_database_url
from prod.redaction import REDACTOR

if TYPE_CHECKING:
    from prod.runtime_settings import RuntimeSettings

DB_TIMEOUT_SECONDS = 3
# ImapError.kind (emailops.imap.errors) -> error_type, when no folder syncs.
SYNC_ERROR_TYPES = {
    "connection": "ImapServerUnreachable",
    "auth": "ImapSignInRefused",
    "folder_missing": "ImapFolderMissing",
    "tls": "ImapTlsFailed",
    "too_many_connections": "ImapTooManyConnections",
    "connection_budget": "ImapConnectionBudgetFull",
}
SYNC_STALE = "FolderSyncStale"
# emailops.network_waits service -> error_type, when its server does not answer.
NOT_ANSWERING_TYPES = {"imap": "ImapServerNotAnswering"}
SMTP_SIGN_IN_REFUSED = "SmtpSignInRefused"
# Account states (emailops.store.account_state) that a restart does not change: the operator must act.
_WAITING_FOR_THE_OPERATOR = ("auth_failed", "disabled")


class Unhealthy(Exception):
    def __init__(self, error_type: str, error: str) -> None:
        super().__init__(error)
        self.error_type = error_type
        self.error = error


def _check_state_dir(state_dir: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".healthcheck."):
            pass
    except OSError as exc:
        raise Unhealthy(
            "StateDirNotWritable", f"STATE_DIR {state_dir} is not writable: {exc.strerror}"
        ) from None


@dataclass(frozen=True)
class AccountRow:
    """An account's row in ``account_state`` (``emailops.store.account_state``), ages by the
    database's clock."""

    account: str
    state: str
    failures: int
    error_kind: str | None
    error: str | None
    last_sync_age_seconds: float | None
    next_attempt_in_seconds: float | None


# The account states, with the ages computed by the database: its clock is the one they were written by.
_ACCOUNTS_SQL = {
    "sqlite": (
        "SELECT account, state, failures, last_error_kind, last_error, "
        "(julianday('now') - julianday(last_synced_at)) * 86400.0, "
        "(julianday(next_attempt_at) - julianday('now')) * 86400.0 FROM account_state ORDER BY account"
    ),
    "postgresql": (
        "SELECT account, state, failures, last_error_kind, last_error, "
        "extract(epoch FROM statement_timestamp() - last_synced_at)::float8, "
        "extract(epoch FROM next_attempt_at - statement_timestamp())::float8 "
        "FROM account_state ORDER BY account"
    ),
}
_HAS_ACCOUNTS_SQL = {
    "sqlite": "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'account_state'",
    "postgresql": "SELECT to_regclass('account_state') IS NOT NULL",
}


def _check_database(url: str) -> list[AccountRow]:
    """Open the index read-only and read the accounts' states, none before the workers made the
    table (stdlib sqlite3 or psycopg: no SQLAlchemy import)."""
    parsed = parse_database_url(url)
    try:
        rows = _read_sqlite(Path(parsed.database)) if parsed.backend == "sqlite" else _read_postgresql(parsed)
    except Unhealthy:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise Unhealthy("DatabaseUnreachable", f"INDEX_DB_URL: {type(exc).__name__}: {reason}") from None
    return [AccountRow(*row) for row in rows]


def _read_sqlite(path: Path) -> list[Any]:
    if not path.exists():
        # Created by the first worker; only a missing directory makes that impossible.
        if not path.parent.is_dir():
            raise Unhealthy("DatabaseUnreachable", f"INDEX_DB_URL: directory {path.parent} does not exist")
        return []
    import sqlite3

    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=DB_TIMEOUT_SECONDS)
    try:
        # SQLite opens files lazily: reading the schema makes a garbage file fail here.
        if not connection.execute(_HAS_ACCOUNTS_SQL["sqlite"]).fetchone()[0]:
            return []
        return connection.execute(_ACCOUNTS_SQL["sqlite"]).fetchall()
    finally:
        connection.close()


def _read_postgresql(url: DatabaseUrl) -> list[Any]:
    import psycopg

    params: dict[str, Any] = {
        **url.query,
        "dbname": url.database,
        "connect_timeout": max(1, int(DB_TIMEOUT_SECONDS)),
    }
    for key, value in (
        ("host", url.host),
        ("port", url.port),
        ("user", url.username),
        ("password", url.password),
    ):
        if value is not None:
            params[key] = value
    with psycopg.connect(**params) as connection:
        found = connection.execute(_HAS_ACCOUNTS_SQL["postgresql"]).fetchone()
        if found is None or not found[0]:
            return []
        return connection.execute(_ACCOUNTS_SQL["postgresql"]).fetchall()


def _accounts_detail(accounts: list[AccountRow], detail: dict[str, Any]) -> None:
    """The accounts that are not ok, for ``--verbose``."""
    from emailops.metrics import account_label

    shown = [
        {
            "account": row.account,
            "metrics_label": account_label(row.account),
            "state": row.state,
            "failures": row.failures,
            "error_kind": row.error_kind,
            "error": row.error,
            "last_sync_age_seconds": _rounded(row.last_sync_age_seconds),
            "next_attempt_in_seconds": _rounded(row.next_attempt_in_seconds),
        }
        for row in accounts
        if row.state != "ok"
    ]
    if shown:
        detail["accounts"] = shown


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _restart_would_not_help(settings: RuntimeSettings, accounts: list[AccountRow]) -> bool:
    """Some account has synced within the limit, or every account waits for the operator (its
    sign-in refused, or disabled): then no sync is no reason to restart the container."""
    limit = settings.health_max_sync_age
    if any(row.last_sync_age_seconds is not None and row.last_sync_age_seconds <= limit for row in accounts):
        return True
    return bool(accounts) and all(row.state in _WAITING_FOR_THE_OPERATOR for row in accounts)


def _check_processes(settings: RuntimeSettings, detail: dict[str, Any]) -> state_file.SupervisorState:
    state = state_file.read_state(settings.state_dir)
    if state is None:
        raise Unhealthy("SupervisorNotRunning", f"no supervisor state in {settings.state_dir}")
    now = time.time()
    detail["supervisor"] = {"pid": state.pid, "age_seconds": round(now - state.heartbeat, 1)}
    if not pid_alive(state.pid):
        raise Unhealthy("SupervisorNotRunning", f"supervisor pid {state.pid} is not running")
    if now - state.heartbeat > state_file.SUPERVISOR_STALE_SECONDS:
        raise Unhealthy(
            "SupervisorStale", f"supervisor state is {now - state.heartbeat:.0f} s old (pid {state.pid})"
        )
    live = 0
    detail["workers"] = []
    for worker in state.workers:
        age = now - worker.last_heartbeat if worker.last_heartbeat else None
        alive = pid_alive(worker.pid) and age is not None and age <= settings.heartbeat_timeout_seconds
        live += alive
        detail["workers"].append(
            {
                "worker": worker.worker,
                "pid": worker.pid,
                "state": worker.state,
                "heartbeat_age_seconds": None if age is None else round(age, 1),
                "live": alive,
            }
        )
    if live < settings.workers:
        raise Unhealthy("WorkersMissing", f"{live} of {settings.workers} workers are live")
    return state


def _age(now: float, moment: float | None) -> float | None:
    return None if moment is None else round(now - moment, 1)


def _read_statuses(
    settings: RuntimeSettings, state: state_file.SupervisorState, detail: dict[str, Any]
) -> list[worker_status.WorkerStatus]:
    """The status files of the current workers; each one's view goes into ``detail``."""
    now = time.time()
    statuses = []
    for worker, shown in zip(state.workers, detail.get("workers", []), strict=True):
        status = worker_status.read_status(settings.state_dir, worker.worker, worker.pid)
        if status is None:
            continue
        statuses.append(status)
        shown["uptime_seconds"] = _age(now, status.started_at)
        shown["folders"] = [
            {
                "folder": folder.folder,
                "last_sync_age_seconds": _age(now, folder.last_sync_at),
                "last_error": None
                if folder.error_kind is None
                else {
                    "error_type": SYNC_ERROR_TYPES.get(folder.error_kind, SYNC_STALE),
                    "error": folder.error,
                    "age_seconds": _age(now, folder.error_at),
                },
            }
            for folder in status.folders
        ]
        if status.smtp is not None:
            shown["smtp"] = _smtp_detail(now, status.smtp)
        if status.waiting is not None:
            shown["waiting"] = _wait_detail(now, status.waiting)
        if status.not_answering:
            shown["not_answering"] = [_wait_detail(now, report) for report in status.not_answering]
    return statuses


def _wait_detail(now: float, report: worker_status.WaitReport) -> dict[str, Any]:
    return {"service": report.service, "endpoint": report.endpoint, "age_seconds": _age(now, report.since)}


def _check_servers_answer(settings: RuntimeSettings, statuses: list[worker_status.WorkerStatus]) -> None:
    """Unhealthy when a worker's calls to the IMAP server have timed out for longer than one
    timeout, with no answer since: the error names the server and since when."""
    now = time.time()
    silent = [
        (report, status.worker)
        for status in statuses
        for report in status.not_answering
        if report.service in NOT_ANSWERING_TYPES and now - report.since > settings.email_timeout_seconds
    ]
    if not silent:
        return
    oldest, _ = min(silent, key=lambda entry: entry[0].since)
    workers = sorted({worker for report, worker in silent if report.endpoint == oldest.endpoint})
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(oldest.since))
    raise Unhealthy(
        NOT_ANSWERING_TYPES[oldest.service],
        f"the {oldest.service.upper()} server {oldest.endpoint} has not answered since {since} "
        f"({now - oldest.since:.0f} s; each call gives up after EMAIL_TIMEOUT_SECONDS="
        f"{settings.email_timeout_seconds:g}); worker(s) {', '.join(map(str, workers))} wait for it",
    )


def _smtp_detail(now: float, smtp: worker_status.SmtpReport) -> dict[str, Any]:
    return {
        "last_sign_in_age_seconds": _age(now, smtp.signed_in_at),
        "refused_for_seconds": _age(now, smtp.refused_since),
        "last_error": None
        if smtp.error is None
        else {
            "error_type": SMTP_SIGN_IN_REFUSED,
            "error": smtp.error,
            "age_seconds": _age(now, smtp.error_at),
        },
    }


def _check_sync(
    settings: RuntimeSettings, statuses: list[worker_status.WorkerStatus], accounts: list[AccountRow]
) -> None:
    """Unhealthy when the workers watch folders and none has synced for the configured time, unless
    a restart would not help (``_restart_would_not_help``)."""
    now = time.time()
    watching = [status for status in statuses if status.folders]
    if not watching:
        return  # nothing watched here (all folders held by another container, or not a mail unit)
    folders = [folder for status in watching for folder in status.folders]
    synced = [folder.last_sync_at for folder in folders if folder.last_sync_at is not None]
    since = max(synced) if synced else min(status.started_at for status in watching)
    limit = settings.health_max_sync_age
    if now - since <= limit:
        return
    if _restart_would_not_help(settings, accounts):
        return
    failing = [folder for folder in folders if folder.current_error]
    what = "has synced" if synced else "has synced since the workers started"
    message = f"no watched folder {what} for {now - since:.0f} s (limit {limit:.0f} s)"
    if not failing:
        raise Unhealthy(SYNC_STALE, message)
    latest = max(failing, key=lambda folder: folder.error_at or 0.0)
    raise Unhealthy(
        SYNC_ERROR_TYPES.get(latest.error_kind or "", SYNC_STALE),
        f"{message}; last error ({latest.folder}): {latest.error}",
    )


def _check_smtp(settings: RuntimeSettings, statuses: list[worker_status.WorkerStatus]) -> None:
    """Unhealthy when the SMTP server has refused the sign-in for the configured time, with no
    successful sign-in by any worker since. SMTP is used only for due replies: a daemon with none
    has no refusal to report."""
    reports = [status.smtp for status in statuses if status.smtp is not None]
    signed_in = max((report.signed_in_at for report in reports if report.signed_in_at), default=0.0)
    # A worker refused since before another one's sign-in is not refused "continuously".
    refusing = [report for report in reports if report.refused_since and report.refused_since > signed_in]
    if not refusing:
        return
    since = min(report.refused_since or 0.0 for report in refusing)
    limit = settings.health_max_sync_age
    now = time.time()
    if now - since <= limit:
        return
    latest = max(refusing, key=lambda report: report.error_at or 0.0)
    raise Unhealthy(
        SMTP_SIGN_IN_REFUSED,
        f"the SMTP server {settings.email_smtp_host}:{settings.email_smtp_port} has refused the account's "
        f"sign-in for {now - since:.0f} s (limit {limit:.0f} s), so no reply is sent; last error: "
        f"{latest.error}; fix: {_smtp_fix(settings)}; healthy again once a reply is sent",
    )


def _smtp_fix(settings: RuntimeSettings) -> str:
    if settings.email_auth == "oauth2":
        return (
            "allow the app to send as EMAIL_USERNAME (Microsoft 365: enable Authenticated SMTP for the "
            "mailbox; the SMTP scope in EMAIL_OAUTH2_SCOPES), or sign in again with `emailops auth login`"
        )
    return "check EMAIL_USERNAME/EMAIL_PASSWORD (Microsoft 365: enable Authenticated SMTP for the mailbox)"


def check(verbose: bool = False) -> tuple[dict[str, Any], int]:
    """The healthcheck's answer and exit code."""
    from prod.runtime_settings import ConfigError, RuntimeSettings

    detail: dict[str, Any] = {}
    try:
        try:
            settings = RuntimeSettings.from_env()
        except ConfigError as exc:
            raise Unhealthy("ConfigError", str(exc)) from None
        REDACTOR.register(settings.email_password.get_secret_value(), username=settings.email_username)
        for secret in settings.oauth2_secrets():
            REDACTOR.register(secret)
        REDACTOR.register_url_password(settings.index_db_url)
        _check_state_dir(settings.state_dir)
        accounts = _check_database(settings.index_db_url)
        _accounts_detail(accounts, detail)
        state = _check_processes(settings, detail)
        statuses = _read_statuses(settings, state, detail)
        _check_servers_answer(settings, statuses)
        _check_sync(settings, statuses, accounts)
        _check_smtp(settings, statuses)
    except Unhealthy as exc:
        answer: dict[str, Any] = {"ok": False, "error": exc.error, "error_type": exc.error_type}
        code = 1
    except Exception as exc:
        answer = {"ok": False, "error": str(exc), "error_type": type(exc).__name__}
        code = 1
    else:
        answer = {
            "ok": True,
            "env": settings.env,
            "log_level": settings.log_level,
            "workers": settings.workers,
        }
        code = 0
    if verbose and detail:
        answer["detail"] = detail
    return REDACTOR.redact(answer), code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prod.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="add a 'detail' object to the answer")
    args = parser.parse_args(argv)
    answer, code = check(verbose=args.verbose)
    print(json.dumps(answer))
    return code


if __name__ == "__main__":
    sys.exit(main())
