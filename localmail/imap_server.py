"""What every throwaway IMAP server of ``localmail`` offers the tests: accounts, IMAP, LMTP, processes.

``LocalDovecot`` and ``LocalCyrus`` implement the server-specific parts (configuration, start,
stop, session processes, bulk loading); the account helpers below only speak IMAP and LMTP, so a
test written against this class runs unchanged against either server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import imapclient

from localmail.certs import TestCertificates

_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]", re.IGNORECASE)
READY_TIMEOUT_SECONDS = 15.0
# The servers' processes end within milliseconds of SIGTERM; past this they are killed.
STOP_GRACE_SECONDS = 2.0


class LocalServerError(RuntimeError):
    """A local mail server could not be started, stopped or driven."""


def wait_for_greeting(
    host: str, port: int, prefix: bytes, deadline: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Return once a TCP server on ``host:port`` greets with ``prefix``; raise at ``deadline``.

    An empty ``prefix`` waits only until the port accepts connections.

    Connect attempts are retried until the deadline, with a short pause only after a refusal;
    ``alive`` returning False (the server process has exited) ends the wait at once.
    """
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise LocalServerError("the server process exited")
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                if not prefix:
                    return  # a TLS port speaks only after the client's hello: listening is enough
                greeting = sock.recv(512)
            if greeting.startswith(prefix):
                return
            last_error = LocalServerError(f"unexpected greeting {greeting[:80]!r}")
        except OSError as error:
            last_error = error
        time.sleep(0.02)
    raise LocalServerError(f"no greeting from {host}:{port} in time: {last_error}")


def _process_group_alive(group_id: int) -> bool:
    try:
        os.killpg(group_id, 0)
    except ProcessLookupError:
        return False
    return True


def start_in_own_session(
    command: list[str], output_file: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server's master in a new session (its own process group), output appended to a file."""
    with output_file.open("ab") as output:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=env,
            start_new_session=True,
        )


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group ``process`` leads, SIGKILL what is left after the grace time; wait for all."""
    # Signalling the whole group stops every process at once; SIGTERM to the master alone makes
    # Dovecot wait about a second for its children.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        os.killpg(process.pid, signal.SIGCONT)  # a frozen server (``freeze``) handles it too
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_GRACE_SECONDS)
    # Children may outlive the master briefly; the ports are only free once they are gone.
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while _process_group_alive(process.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.01)


def lmtp_deliver(host: str, port: int, mail_from: str, recipient: str, raw: bytes) -> None:
    """One LMTP transaction for one recipient; raises ``smtplib.SMTPException`` on refusal.

    One recipient per transaction because LMTP answers DATA once per recipient and
    ``smtplib.LMTP`` reads only the first answer.
    """
    with smtplib.LMTP(host, port, timeout=30) as lmtp:
        lmtp.sendmail(mail_from, [recipient], raw)


class LocalImapServer(ABC):
    """One private IMAP + LMTP server on loopback with password accounts (plain IMAP on ``imap_port``)."""

    #: Which server this is ("dovecot", "cyrus"), as failure messages name it.
    kind: str
    #: What ``start()`` raises when the server does not become ready.
    error_class: type[LocalServerError] = LocalServerError
    _process: subprocess.Popen[bytes] | None = None
    #: Holds everything the instance owns; removed by ``close()`` when the instance made it.
    work_dir: Path
    _owns_work_dir: bool
    host: str
    imap_port: int
    lmtp_port: int
    #: The test CA and server certificate when the server speaks TLS.
    certificates: TestCertificates | None = None
    _users: dict[str, str]

    # ----------------------------------------------------------------------------- lifecycle

    @abstractmethod
    def _launch(self) -> subprocess.Popen[bytes]:
        """Start the server's master process in its own session (``start_in_own_session``)."""

    @abstractmethod
    def _finish_start(self, deadline: float, alive: Callable[[], bool]) -> None:
        """What else must be ready once IMAP and LMTP greet; raise ``LocalServerError`` if not."""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the master and return once IMAP and LMTP greet (raises with the log otherwise)."""
        if self.running:
            return
        process = self._process = self._launch()
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS

        def alive() -> bool:
            return process.poll() is None

        try:
            wait_for_greeting(self.host, self.imap_port, b"* OK", deadline, alive)
            wait_for_greeting(self.host, self.lmtp_port, b"220", deadline, alive)
            self._finish_start(deadline, alive)
        except (LocalServerError, OSError) as error:
            exit_code = process.poll()
            self.stop()
            raise self.error_class(
                f"{self.kind.capitalize()} did not become ready ({error}; exit code {exit_code}).\n"
                f"{self.log_tail()}"
            ) from error

    def stop(self) -> None:
        """Stop the master and all its processes (clients are disconnected); mail stays."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            stop_process_group(process)

    def freeze(self) -> None:
        """Stop every process of the server where it stands (SIGSTOP to its process group), as a
        hung or overloaded server: the kernel still accepts connections, nothing answers."""
        assert self._process is not None, f"{self.kind} is not running"
        os.killpg(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let the processes stopped by ``freeze`` go on (SIGCONT); connections left open resume."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop, and remove the work folder if this instance made it."""
        self.stop()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same ports with the same mail."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()  # __exit__ will not run, and the work folder must not be left behind
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def log_text(self) -> str:
        """The server's log so far (for assertions and for failure messages)."""

    @abstractmethod
    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's logs, for failure messages."""

    # ----------------------------------------------------------------------------- accounts

    @property
    def users(self) -> dict[str, str]:
        return dict(self._users)

    def password(self, user: str) -> str:
        try:
            return self._users[user]
        except KeyError:
            raise KeyError(f"{user!r} is not an account of this {self.kind} server") from None

    # ----------------------------------------------------------------------------- IMAP access

    def imap(
        self, user: str, *, timeout: float = 30.0
    ) -> contextlib.AbstractContextManager[imapclient.IMAPClient]:
        """A logged-in IMAPClient over the plain port (loopback), logged out afterwards."""
        return self.signed_in(user, self.password(user), timeout=timeout)

    @contextlib.contextmanager
    def signed_in(
        self, user: str, password: str, *, timeout: float = 30.0
    ) -> Iterator[imapclient.IMAPClient]:
        """As ``imap``, for a login that is not one of ``users`` (an admin, a wrong password)."""
        client = imapclient.IMAPClient(self.host, self.imap_port, ssl=False, timeout=timeout)
        try:
            client.login(user, password)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def append(
        self,
        user: str,
        folder: str,
        raw: bytes,
        flags: Iterable[str] = (),
        internaldate: datetime | None = None,
    ) -> int:
        """APPEND one message and return its UID (from UIDPLUS' APPENDUID)."""
        with self.imap(user) as client:
            response = client.append(folder, raw, tuple(flags), internaldate)
        match = _APPENDUID.search(response)
        if match is None:
            raise LocalServerError(f"APPEND gave no APPENDUID: {response!r}")
        return int(match.group(1))

    def create_folder(self, user: str, folder: str) -> None:
        with self.imap(user) as client:
            client.create_folder(folder)

    def delete_folder(self, user: str, folder: str) -> None:
        """Delete a folder; creating it again gives it a new UIDVALIDITY."""
        with self.imap(user) as client:
            client.delete_folder(folder)

    def folder_status(self, user: str, folder: str = "INBOX") -> dict[str, int]:
        """STATUS of a folder: ``messages``, ``uidnext``, ``uidvalidity``, ``unseen``."""
        with self.imap(user) as client:
            status = client.folder_status(folder, [b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN"])
        return {key.decode().lower(): int(value) for key, value in status.items()}

    @abstractmethod
    def bulk_load(
        self,
        user: str,
        folder: str,
        messages: Iterable[bytes],
        flags: Iterable[str] = (),
    ) -> int:
        """Store many messages in ``folder`` (made if missing), UIDs in order; returns how many."""

    # ----------------------------------------------------------------------------- delivery

    def deliver(self, user: str | Iterable[str], raw: bytes, mail_from: str = "sender@example.org") -> None:
        """Deliver like an MTA would, over LMTP, into INBOX of each recipient."""
        recipients = [user] if isinstance(user, str) else list(user)
        for recipient in recipients:
            lmtp_deliver(self.host, self.lmtp_port, mail_from, recipient, raw)

    # ----------------------------------------------------------------------------- processes

    @abstractmethod
    def imap_process_ids(self, user: str | None = None) -> list[int]:
        """Pids of this instance's logged-in IMAP sessions (all, or those of ``user``)."""

    def kill_imap_connections(self, user: str | None = None, sig: int = signal.SIGKILL) -> int:
        """Kill IMAP session processes, dropping their connections mid-command; returns how many.

        SIGKILL (the default) drops the connection with no BYE, like a crash or a network cut;
        SIGTERM lets the server end the session itself (Dovecot says BYE).
        """
        pids = self.imap_process_ids(user)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(pids)
