"""The only place that reaches below imapclient into the stdlib ``imaplib.IMAP4`` it drives.

imapclient keeps that connection in its private attribute ``_imap``. The product uses it for what
imapclient does not offer or does slowly: a raw ``UID FETCH`` whose answer is parsed with regular
expressions (``bulk_fetch.py``: half the cost of an initial sync), the untagged answers imaplib set
aside and its read-ahead buffer (``announcements.py``: mail that arrived during our own command),
imaplib's debug level (``connection.py``), and its I/O methods, marked as network waits
(``WaitMarkingIMAPClient``). ``tests/test_imaplib_internals.py`` pins each
behaviour relied on here against a real Dovecot, so that an upgrade of imapclient or Python that
changes one fails a test, not production.
"""

from __future__ import annotations

import imaplib
import io
from collections.abc import Callable
from typing import Any

from imapclient import IMAPClient

from emailops.network_waits import OPENING_TIMEOUTS, OVERDUE_GRACE_SECONDS, WAITS


def uid_command(client: IMAPClient, command: str, *args: str) -> tuple[str, list[Any]]:
    """imaplib's ``IMAP4.uid``: the status word and the raw answer, where a message's literal comes
    as a ``(head, literal)`` tuple followed by the rest of its line."""
    typ, data = client._imap.uid(command, *args)
    return typ, data


def set_aside_answers(client: IMAPClient) -> dict[str, list[Any]]:
    """imaplib's untagged answers that no command claimed, by kind (``EXISTS``, ``FETCH``, ...);
    the caller may pop from it."""
    stash: dict[str, list[Any]] = client._imap.untagged_responses
    return stash


def read_ahead_buffer(client: IMAPClient) -> io.BufferedReader:
    """The buffered reader imaplib reads the server's answers from (``peek`` tells whether bytes
    wait in it or on the socket)."""
    reader: io.BufferedReader = client._imap.file
    return reader


def send_idle_done(client: IMAPClient) -> None:
    """The first half of imapclient's ``idle_done``: DONE is sent, its answer not waited for."""
    client._imap.send(b"DONE\r\n")


def finish_idle_done(client: IMAPClient) -> None:
    """The second half: read up to IDLE's tagged answer (its untagged answers are dropped: the
    sync that follows looks at the folder itself), raising as ``idle_done`` does on NO or BAD."""
    client._consume_until_tagged_response(client._idle_tag, "IDLE")


def silence_imaplib_debug(client: IMAPClient) -> None:
    """imapclient sets imaplib's debug level to 5, at which imaplib formats the repr of every
    response, whole messages included, before the logger drops it; level 0 formats nothing."""
    client._imap.debug = 0


class WaitMarkingIMAPClient(IMAPClient):  # type: ignore[misc]  # imapclient has no type hints
    """An ``IMAPClient`` whose every blocking call on its socket is a network wait
    (``emailops.network_waits``): opening the connection (connect, TLS, greeting), then each of
    imaplib's ``read``, ``readline`` and ``send``, the I/O methods imaplib's documentation says a
    subclass may override, each bounded by the read timeout. Without a timeout nothing is marked:
    an unbounded call is no sign of life."""

    def _create_IMAP4(self) -> imaplib.IMAP4:
        timeout = self._timeout.read
        if timeout is None:
            return super()._create_IMAP4()  # type: ignore[no-any-return]
        endpoint = f"{self.host}:{self.port}"
        opening = (self._timeout.connect or timeout) * OPENING_TIMEOUTS + OVERDUE_GRACE_SECONDS
        with WAITS.waiting("imap", endpoint, opening):
            imap: imaplib.IMAP4 = super()._create_IMAP4()
        for name in ("read", "readline", "send"):
            setattr(imap, name, _marked(getattr(imap, name), endpoint, timeout + OVERDUE_GRACE_SECONDS))
        return imap


def _marked(call: Callable[..., Any], endpoint: str, bound_seconds: float) -> Callable[..., Any]:
    def marked(*args: Any) -> Any:
        with WAITS.waiting("imap", endpoint, bound_seconds):
            return call(*args)

    return marked
