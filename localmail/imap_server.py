"""What every throwaway IMAP server of ``localmail`` offers the tests: accounts, IMAP, LMTP, processes.

``LocalDovecot`` and ``LocalCyrus`` implement the server-specific parts (configuration, start,
stop, session processes, bulk loading); the account helpers below only speak IMAP and LMTP, so a
test written against this class runs unchanged against either server.
"""

from __future__ import annotations

import contextlib
import re
import signal
import smtplib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from datetime import datetime
from os import kill
from types import TracebackType
from typing import Self

import imapclient

from localmail.certs import TestCertificates

_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]", re.IGNORECASE)


class LocalServerError(RuntimeError):
    """A local mail server could not be started, stopped or driven."""


def lmtp_deliver(host: str, port: int, mail_from: str, recipient: str, raw: bytes) -> None:
    """One LMTP transaction for one recipient; raises ``smtplib.SMTPException`` on refusal.

    One recipient per transaction because LMTP answers DATA once per recipient and
    ``smtplib.LMTP`` reads only the first answer.
    """
    with smtplib.LMTP(host, port, timeout=30) as lmtp:
        lmtp.sendmail(mail_from, [recipient], raw)


class LocalImapServer(ABC):
    """One private IMAP + LMTP server on loopback with password accounts (plain IMAP on ``imap_port``)."""

    #: Which server this is ("dovecot", "cyrus"): for test ids and failure messages.
    kind: str
    host: str
    imap_port: int
    lmtp_port: int
    #: The test CA and server certificate when the server speaks TLS.
    certificates: TestCertificates | None = None
    _users: dict[str, str]

    # ----------------------------------------------------------------------------- lifecycle

    @abstractmethod
    def start(self) -> None:
        """Start the server and return once IMAP and LMTP greet."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server and all its processes (clients are disconnected); mail stays."""

    @abstractmethod
    def close(self) -> None:
        """Stop, and remove the work folder if this instance made it."""

    @property
    @abstractmethod
    def running(self) -> bool: ...

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

    @contextlib.contextmanager
    def imap(self, user: str, *, timeout: float = 30.0) -> Iterator[imapclient.IMAPClient]:
        """A logged-in IMAPClient over the plain port (loopback), logged out afterwards."""
        client = imapclient.IMAPClient(self.host, self.imap_port, ssl=False, timeout=timeout)
        try:
            client.login(user, self.password(user))
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
                kill(pid, sig)
        return len(pids)
