"""Plumbing shared by the sync benchmarks: the private Dovecot, child processes, synthetic mail.

Every measured child (``emailops sync --once``, ``mbsync``, ``notmuch``) runs under the small
``_measure_child`` launcher, so that its wall time and peak resident memory (``ru_maxrss``) come
from the kernel (``wait4``), not from sampling, and do not include the benchmark's own memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import imapclient

from localmail.dovecot import LocalDovecot

REPO_ROOT = Path(__file__).resolve().parent.parent
_LAUNCHER = Path(__file__).resolve().parent / "_measure_child.py"
BENCH_USER = "bench@example.test"
BENCH_PASSWORD = "bench-password"

_WORDS = (
    "invoice", "meeting", "project", "budget", "report", "server", "deploy", "release", "customer",
    "contract", "schedule", "question", "answer", "review", "draft", "update", "network", "storage",
    "backup", "restore", "quarter", "revenue", "travel", "holiday", "printer", "kitchen", "garden",
    "football", "weather", "coffee", "lunch", "support", "ticket", "incident",
)  # fmt: skip


@dataclass(frozen=True)
class ChildResult:
    """How one child process ended: exit code, wall seconds, peak RSS in bytes, CPU seconds."""

    returncode: int
    seconds: float
    max_rss_bytes: int
    stdout: str
    stderr: str
    cpu_seconds: float = 0.0


def fresh_postgres(admin: str, name: str) -> str:
    """The URL of database ``name``, dropped and created empty on the server of ``admin``."""
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


def ensure_inotify_instances(idle_sessions: int) -> str:
    """Raise the kernel's inotify instances per user (root only) so that Dovecot can watch the
    mailbox of each of ``idle_sessions`` IDLE sessions; what was done, to print.

    Past the limit (Debian's default is 128) Dovecot disables inotify for the session and looks
    at the mailbox only every ``mailbox_idle_check_interval`` (30 s): IDLE still works, but new
    mail is told up to 30 s late, which a benchmark would count as the daemon's delay."""
    wanted = idle_sessions + 256
    current = int(INOTIFY_INSTANCES.read_text())
    if current >= wanted:
        return f"fs.inotify.max_user_instances {current}"
    try:
        INOTIFY_INSTANCES.write_text(str(wanted))
    except OSError as exc:
        return f"fs.inotify.max_user_instances {current} (could not raise it to {wanted}: {exc})"
    return f"fs.inotify.max_user_instances raised from {current} to {wanted}"


def start_dovecot(
    capabilities_removed: tuple[str, ...] = (), users: Mapping[str, str] | None = None
) -> LocalDovecot:
    """A started private Dovecot with ``users`` (username -> password; default the bench user)."""
    ensure_inotify_instances(len(users or {}))
    dovecot = LocalDovecot(users or {BENCH_USER: BENCH_PASSWORD}, capabilities_removed=capabilities_removed)
    dovecot.start()
    return dovecot


def emailops_env(
    *,
    imap_port: int,
    work_dir: Path,
    folders: str = "INBOX",
    extra: Mapping[str, str] | None = None,
    checkout: Path = REPO_ROOT,
) -> dict[str, str]:
    """The environment of an ``emailops`` / ``prod.run`` child: loopback, no TLS, quiet logs.

    The child runs with ``cwd=work_dir`` so that a developer's ``.env`` in the checkout is not read;
    ``PYTHONPATH`` points at the checkout instead (this one, or another to compare with).
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(("EMAIL_", "INDEX_DB_"))}
    env.update(
        {
            "PYTHONPATH": str(checkout),
            "ENV": "bench",
            "EMAIL_IMAP_HOST": "127.0.0.1",
            "EMAIL_IMAP_PORT": str(imap_port),
            "EMAIL_SMTP_HOST": "127.0.0.1",
            "EMAIL_SMTP_PORT": "2525",
            "EMAIL_USERNAME": BENCH_USER,
            "EMAIL_PASSWORD": BENCH_PASSWORD,
            "EMAIL_IMAP_SECURITY": "none",
            "EMAIL_SMTP_SECURITY": "none",
            "EMAIL_FOLDERS": folders,
            "INDEX_DB_URL": f"sqlite:///{work_dir / 'emailops.db'}",
            "CACHE_DIR": str(work_dir / "cache"),
            "STATE_DIR": str(work_dir / "state"),
            "RULES_FILE": str(work_dir / "rules.toml"),
            "LOG_FILE_ENABLED": "false",
            "LOG_LEVEL": "WARNING",
            "SENTRY_DSN": "",
        }
    )
    if extra:
        env.update(extra)
    return env


def run_child(argv: list[str], *, env: Mapping[str, str], cwd: Path, timeout: float = 900.0) -> ChildResult:
    """Run ``argv`` to completion under ``_measure_child``: wall time and peak RSS of ``argv`` alone.

    Wall time is measured by the launcher around the child (the launcher's own start-up excluded).
    """
    out_path, err_path = cwd / ".child-stdout", cwd / ".child-stderr"
    result_path = cwd / ".child-result.json"
    result_path.unlink(missing_ok=True)
    with out_path.open("wb") as out, err_path.open("wb") as err:
        subprocess.run(
            [sys.executable, str(_LAUNCHER), str(result_path), *argv],
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=err,
            timeout=timeout,
            check=False,
        )
    measured = json.loads(result_path.read_text())
    return ChildResult(
        returncode=int(measured["returncode"]),
        seconds=float(measured["seconds"]),
        max_rss_bytes=int(measured["max_rss_kib"]) * 1024,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        cpu_seconds=float(measured["cpu_seconds"]),
    )


def emailops_sync_once(env: Mapping[str, str], cwd: Path) -> ChildResult:
    result = run_child([sys.executable, "-m", "emailops", "sync", "--once"], env=env, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"emailops sync --once exited {result.returncode}: {result.stderr[-2000:]}")
    return result


class Daemon:
    """``python -m prod.run`` as a child, stopped with SIGTERM (its documented stop signal), in a
    process group of its own: ``kill()`` ends it and its workers at once, as ``docker kill``."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.log_path = cwd / "daemon.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prod.run"],
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the supervisor and its workers together (none can clean up)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def synthetic_messages(count: int, *, seed: int = 7, body_words: int = 120) -> Iterator[bytes]:
    """``count`` small plain-text messages (about 1 KB each), distinct Message-IDs, varied words."""
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for n in range(count):
        body = " ".join(rng.choice(_WORDS) for _ in range(body_words))
        date = format_datetime(start + timedelta(minutes=n))
        yield (
            f"From: Sender {n % 97} <sender{n % 97}@example.org>\r\n"
            f"To: {BENCH_USER}\r\n"
            f"Subject: {rng.choice(_WORDS)} {rng.choice(_WORDS)} number {n}\r\n"
            f"Date: {date}\r\n"
            f"Message-ID: <synthetic-{seed}-{n}@bench.example>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "\r\n"
            f"{body}\r\n"
        ).encode()


def huge_message(total_bytes: int) -> bytes:
    """One multipart message of about ``total_bytes``: a short text part and a base64 attachment."""
    import base64

    payload_size = total_bytes * 3 // 4
    encoded = base64.encodebytes(os.urandom(payload_size))
    head = (
        "From: Big Sender <big@example.org>\r\n"
        f"To: {BENCH_USER}\r\n"
        "Subject: a very large attachment\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        "Message-ID: <huge@bench.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "The attached archive is large.\r\n"
        "--b1\r\n"
        'Content-Type: application/octet-stream; name="archive.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="archive.bin"\r\n'
        "\r\n"
    ).encode()
    return head + encoded.replace(b"\n", b"\r\n") + b"--b1--\r\n"


def token_message(token: str, n: int) -> bytes:
    """A small message whose body carries ``token`` (one FTS word) for the latency probe."""
    return (
        "From: Probe <probe@example.org>\r\n"
        f"To: {BENCH_USER}\r\n"
        f"Subject: latency probe {n}\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\n"
        f"Message-ID: <probe-{token}@bench.example>\r\n"
        "\r\n"
        f"Probe body with the token {token} in it.\r\n"
    ).encode()


class PushProbe:
    """A bare IMAPClient in IDLE on INBOX, noting when each EXISTS arrives: the server's own share
    of the latency (Dovecot delays IDLE notifications by a fixed 500 ms after a change, see
    ``NOTIFY_DELAY_MSECS`` in its ``src/lib-storage/mailbox-watch.c``)."""

    def __init__(self, dovecot: LocalDovecot) -> None:
        self.arrivals: list[float] = []
        self._stop = threading.Event()
        self._client = imapclient.IMAPClient(dovecot.host, dovecot.imap_port, ssl=False, timeout=30)
        self._client.login(BENCH_USER, BENCH_PASSWORD)
        self._client.select_folder("INBOX", readonly=True)
        self._client.idle()
        self._thread = threading.Thread(target=self._listen, name="push-probe", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            responses = self._client.idle_check(timeout=0.2)
            now = time.perf_counter()
            if any(isinstance(r, tuple) and len(r) > 1 and r[1] == b"EXISTS" for r in responses):
                self.arrivals.append(now)

    def first_after(self, moment: float, timeout: float = 5.0) -> float | None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            later = [t for t in self.arrivals if t > moment]
            if later:
                return later[0]
            time.sleep(0.005)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._client.idle_done()
            self._client.logout()
