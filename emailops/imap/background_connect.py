"""Opening an IMAP connection on a thread of its own, for a worker loop that serves many folders.

Connecting (TCP, TLS, greeting, login) waits on the server up to its timeout, and a sign-in may
also wait for its turn (``connection_budget``). On the loop's thread, a server that accepts and
then says nothing would hold up every folder of every account for that long; here it holds up only
the folder that waits for it. The loop waits on ``ready_socket()`` with its other sockets.

The attempt runs in a copy of the caller's context (``contextvars``), as if the caller connected:
what the caller bound for its log lines applies to the lines logged while connecting, and an error
tracker that keeps its scope in a context variable gets them as breadcrumbs of the caller's later
events (a token refresh that failed, before the sign-in it refused).
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
from collections.abc import Callable

from imapclient import IMAPClient

from emailops.imap.connection import logout_quietly


class ConnectAttempt:
    """One connection being opened by ``open_connection`` on a daemon thread."""

    def __init__(self, open_connection: Callable[[], IMAPClient]) -> None:
        self._ready, self._signal = socket.socketpair()
        self._lock = threading.Lock()
        self._done = False
        self._abandoned = False
        self._client: IMAPClient | None = None
        self._error: BaseException | None = None
        context = contextvars.copy_context()
        threading.Thread(
            target=context.run, args=(self._run, open_connection), name="imap-connect", daemon=True
        ).start()

    @property
    def done(self) -> bool:
        with self._lock:
            return self._done

    def ready_socket(self) -> socket.socket:
        """Readable once the attempt is done (succeeded or failed)."""
        return self._ready

    def result(self) -> IMAPClient:
        """The connection, or the attempt's exception (only once ``done``)."""
        with self._lock:
            assert self._done, "the attempt is still connecting"
        self._close_signal()
        if self._error is not None:
            raise self._error
        assert self._client is not None
        return self._client

    def abandon(self, *, log_out: bool = True) -> None:
        """Nobody waits for the connection any more: logged out once opened, unless ``log_out`` is
        False (a connection others use, such as a ``SharedConnection``'s)."""
        with self._lock:
            self._abandoned = log_out
            client, self._client = self._client, None
        if client is not None and log_out:
            logout_quietly(client)
        self._close_signal()

    def _run(self, open_connection: Callable[[], IMAPClient]) -> None:
        client: IMAPClient | None = None
        error: BaseException | None = None
        try:
            client = open_connection()
        except BaseException as exc:  # handed to the loop's thread by result()
            error = exc
        with self._lock:
            self._done = True
            abandoned = self._abandoned
            if not abandoned:
                self._client, self._error = client, error
        if abandoned and client is not None:
            logout_quietly(client)
        with contextlib.suppress(OSError):
            self._signal.send(b"\0")

    def _close_signal(self) -> None:
        self._ready.close()
        self._signal.close()
