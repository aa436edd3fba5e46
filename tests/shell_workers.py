"""Worker targets for the supervision tests (``EMAILOPS_WORKER_TARGET=tests.shell_workers:...``).

Each unit records what it does in ``$SHELL_WORKER_DIR`` so that tests can see units begin and end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from prod.runtime_settings import RuntimeSettings

UNIT_SECONDS = float(os.environ.get("SHELL_WORKER_UNIT_SECONDS", "0.3"))
# How long closing takes (a real unit logs out of IMAP and releases its leases).
CLOSE_SECONDS = float(os.environ.get("SHELL_WORKER_CLOSE_SECONDS", "0"))


def _record_dir() -> Path:
    return Path(os.environ["SHELL_WORKER_DIR"])


class JournalingUnit:
    """Appends ``begin N`` and ``end N`` to ``unit-<worker>-<pid>.log`` around a short sleep."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.journal = _record_dir() / f"unit-{worker_id}-{os.getpid()}.log"
        self.count = 0
        self.log = logging.getLogger("tests.shell_workers")

    def run_once(self) -> None:
        self.count += 1
        with self.journal.open("a") as journal:
            journal.write(f"begin {self.count}\n")
            journal.flush()
            time.sleep(UNIT_SECONDS)
            journal.write(f"end {self.count}\n")
        self.log.info("unit done %d", self.count)

    def close(self) -> None:
        time.sleep(CLOSE_SECONDS)
        with self.journal.open("a") as journal:
            journal.write("closed\n")


def journaling_unit(settings: RuntimeSettings, worker_id: int) -> JournalingUnit:
    return JournalingUnit(worker_id)


def failing_boot(settings: RuntimeSettings, worker_id: int) -> JournalingUnit:
    with (_record_dir() / "boots").open("a") as boots:
        boots.write(f"{os.getpid()}\n")
    raise ConnectionRefusedError("cannot reach the IMAP server (test)")


class HangingUnit(JournalingUnit):
    """Works normally in the first process of worker 1, then hangs forever in its second unit."""

    def run_once(self) -> None:
        marker = _record_dir() / "hung-once"
        if self.count >= 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(3600)
        super().run_once()


def hanging_unit(settings: RuntimeSettings, worker_id: int) -> JournalingUnit:
    return HangingUnit(worker_id) if worker_id == 1 else JournalingUnit(worker_id)


class NetworkWaitingUnit(JournalingUnit):
    """The second unit of each first process waits on a server (``WAITS.waiting``) for
    ``SHELL_WORKER_WAIT_SECONDS``: worker 1 within the wait's bound, then it goes on; worker 2 in a
    wait whose bound is 1 s, as a call stuck past its socket timeout. Each writes ``waiting-<n>``."""

    def run_once(self) -> None:
        from emailops.network_waits import WAITS

        marker = _record_dir() / f"waiting-{self.worker_id}"
        if self.count >= 1 and not marker.exists():
            seconds = float(os.environ["SHELL_WORKER_WAIT_SECONDS"])
            bound = seconds + 30 if self.worker_id == 1 else 1.0
            marker.write_text(str(os.getpid()))
            with WAITS.waiting("imap", "192.0.2.1:143", bound):
                time.sleep(seconds)
        super().run_once()


def network_waiting_unit(settings: RuntimeSettings, worker_id: int) -> NetworkWaitingUnit:
    return NetworkWaitingUnit(worker_id)


class FailingUnit(JournalingUnit):
    """Every unit raises an error whose text and locals hold the password."""

    def __init__(self, worker_id: int, password: str) -> None:
        super().__init__(worker_id)
        self.password = password

    def run_once(self) -> None:
        secret_in_a_local = self.password  # noqa: F841 (Sentry must not send frame locals)
        logging.getLogger("imapclient.imaplib").debug("> b'A001 LOGIN bob \"%s\"'", self.password)
        raise RuntimeError(f"login rejected for password={self.password} ({self.password})")


def failing_unit(settings: RuntimeSettings, worker_id: int) -> FailingUnit:
    return FailingUnit(worker_id, settings.email_password.get_secret_value())


class OutboxGaugeUnit(JournalingUnit):
    """The first worker process sets the outbox gauge (a "live" gauge) to 7 and writes its pid in
    ``outbox-gauge-set``; later processes set nothing: a scrape shows 7 while that value is kept."""

    def run_once(self) -> None:
        marker = _record_dir() / "outbox-gauge-set"
        if not marker.exists():
            from emailops import metrics

            metrics.outbox_depth({"sent": 7}, ["sent"])
            marker.write_text(str(os.getpid()))
        super().run_once()


def outbox_gauge_unit(settings: RuntimeSettings, worker_id: int) -> OutboxGaugeUnit:
    return OutboxGaugeUnit(worker_id)


# -- helpers shared by the shell tests (processes started from a temp dir, settings from env vars)

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Tr0ub4dor&3-horse"  # the secret that must never appear in any output
SETTINGS_VARIABLES = (
    "ENV", "LOG_LEVEL", "LOG_FILE_ENABLED", "LOG_FILE_PATH", "STATE_DIR", "CACHE_DIR", "WORKERS",
    "SENTRY_DSN", "INDEX_DB_URL", "SHUTDOWN_TIMEOUT_SECONDS", "HEARTBEAT_TIMEOUT_SECONDS",
)  # fmt: skip


def shell_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A clean environment for a product process: valid settings pointing into ``tmp_path``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("EMAIL_", "EMAILOPS_", "SENTRY_")) and key not in SETTINGS_VARIABLES
    }
    (tmp_path / "units").mkdir(exist_ok=True)
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        ENV="test",
        LOG_LEVEL="INFO",
        LOG_FILE_ENABLED="true",
        LOG_FILE_PATH=str(tmp_path / "logs" / "app.log"),
        STATE_DIR=str(tmp_path / "state"),
        CACHE_DIR=str(tmp_path / "cache"),
        INDEX_DB_URL=f"sqlite:///{tmp_path / 'emailops.db'}",
        WORKERS="1",
        EMAIL_IMAP_HOST="127.0.0.1",
        EMAIL_IMAP_PORT="1143",
        EMAIL_SMTP_HOST="127.0.0.1",
        EMAIL_SMTP_PORT="1025",
        EMAIL_USERNAME="bob@example.test",
        EMAIL_PASSWORD=PASSWORD,
        SHUTDOWN_TIMEOUT_SECONDS="5",
        HEARTBEAT_TIMEOUT_SECONDS="5",
        EMAILOPS_WORKER_TARGET="tests.shell_workers:journaling_unit",
        SHELL_WORKER_DIR=str(tmp_path / "units"),
    )
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def wait_until(predicate, timeout: float, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; that value, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


class SupervisorProcess:
    """``python -m prod.run`` in its own session, stdout in a file; killed with its workers on exit."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.stdout_path = tmp_path / "supervisor.stdout"
        self.stderr_path = tmp_path / "supervisor.stderr"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SupervisorProcess:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prod.run"],
                cwd=self.tmp_path,
                env=self.env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stdout_lines(self) -> list[str]:
        return self.stdout_path.read_text(encoding="utf-8").splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout_lines()]

    def state(self) -> dict[str, Any] | None:
        path = Path(self.env["STATE_DIR"]) / "supervisor.json"
        return json.loads(path.read_text()) if path.exists() else None

    def worker_pids(self) -> dict[int, int]:
        """Worker id -> pid of the workers that have booted, from the state file."""
        state = self.state() or {}
        return {w["worker"]: w["pid"] for w in state.get("workers", []) if w["last_heartbeat"] > 0}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_python(tmp_path: Path, env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` (dedented) in ``tmp_path`` with ``env``; output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def run_healthcheck(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[str, int, float]:
    """stdout, exit code and CPU time (user + system, unaffected by other load) of the healthcheck."""
    cpu_before = _children_cpu_seconds()
    result = subprocess.run(
        [sys.executable, "-m", "prod.healthcheck", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stderr == "", result.stderr
    return result.stdout, result.returncode, _children_cpu_seconds() - cpu_before


def healthy_line(env: dict[str, str]) -> str:
    return (
        f'{{"ok": true, "env": "{env["ENV"]}", "log_level": "{env["LOG_LEVEL"]}", '
        f'"workers": {int(env["WORKERS"])}}}\n'
    )
