"""Each worker's status file in ``STATE_DIR``: what its folders last saw, for the healthcheck.

A worker whose unit reports a status (the mail pipeline: ``MailPipeline.status()``) rewrites
``STATE_DIR/worker-<n>.json`` about every second, atomically: its pid, start time, and for each
folder it watches the last successful sync and the last IMAP error (``ImapError.kind`` and text),
and, for a unit that sends replies, its SMTP sign-ins (``SmtpSender.sign_in_status()``); and the
server its loop waits for now and the servers that have stopped answering (``emailops.network_waits``),
written also while the loop is blocked on one.
The healthcheck reads these files (``--verbose`` shows them) and fails when no watched folder has
synced for ``HEALTH_MAX_SYNC_AGE_SECONDS``, naming the error the workers last saw, or when the SMTP
server has refused the sign-in for that long with no successful sign-in since. The supervisor
removes the files at its start and stop. Standard library only: the healthcheck imports this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emailops.atomic_file import write_atomically

STATUS_WRITE_INTERVAL_SECONDS = 1.0
_PATTERN = "worker-*.json"


@dataclass(frozen=True)
class FolderReport:
    folder: str
    last_sync_at: float | None
    error_kind: str | None = None
    error: str | None = None
    error_at: float | None = None
    mode: str | None = None  # idle, polling, or None: not connected
    account: str | None = None  # the account's key in the index (None: not reported)

    @property
    def current_error(self) -> bool:
        """The error came after the last sync: the folder is failing now."""
        return self.error_at is not None and (self.last_sync_at is None or self.error_at >= self.last_sync_at)


@dataclass(frozen=True)
class SmtpReport:
    """The worker's SMTP sign-ins (``emailops.replies.smtp_sender.SmtpSignInStatus``, UNIX times)."""

    signed_in_at: float | None = None
    refused_since: float | None = None
    error: str | None = None
    error_at: float | None = None


@dataclass(frozen=True)
class WaitReport:
    """A server of ``service`` (``imap``, ``smtp``) at ``endpoint`` (host:port), since a UNIX time:
    the call the worker waits in, or the first of the calls that timed out with no answer since."""

    service: str
    endpoint: str
    since: float


@dataclass(frozen=True)
class WorkerStatus:
    worker: int
    pid: int
    started_at: float
    updated_at: float
    folders: list[FolderReport] = field(default_factory=list)
    smtp: SmtpReport | None = None  # None: the unit sends no mail
    waiting: WaitReport | None = None  # None: the loop is not waiting on a server now
    not_answering: list[WaitReport] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerStatus:
        data: dict[str, Any] = json.loads(text)
        folders = [FolderReport(**folder) for folder in data.pop("folders", [])]
        smtp = data.pop("smtp", None)
        waiting = data.pop("waiting", None)
        silent = [WaitReport(**report) for report in data.pop("not_answering", [])]
        return cls(
            folders=folders,
            smtp=None if smtp is None else SmtpReport(**smtp),
            waiting=None if waiting is None else WaitReport(**waiting),
            not_answering=silent,
            **data,
        )


def status_path(state_dir: Path, worker: int) -> Path:
    return state_dir / f"worker-{worker}.json"


def write_status(state_dir: Path, status: WorkerStatus) -> None:
    write_atomically(status_path(state_dir, status.worker), status.to_json())


def read_status(state_dir: Path, worker: int, pid: int) -> WorkerStatus | None:
    """The status the worker process ``pid`` wrote, or None (none yet, or a former process's)."""
    try:
        status = WorkerStatus.from_json(status_path(state_dir, worker).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return status if status.pid == pid else None


def remove_all(state_dir: Path) -> None:
    for path in state_dir.glob(_PATTERN):
        path.unlink(missing_ok=True)
