"""The only place that reaches below imapclient into the stdlib ``imaplib.IMAP4`` it drives.

imapclient keeps that connection in its private attribute ``_imap``. The product uses it for what
imapclient does not offer or does slowly: a raw ``UID FETCH`` whose answer is parsed with regular
expressions (``bulk_fetch.py``: half the cost of an initial sync), the untagged answers imaplib set
aside and its read-ahead buffer (``announcements.py``: mail that arrived during our own command),
and imaplib's debug level (``connection.py``). ``tests/test_imaplib_internals.py`` pins each
behaviour relied on here against a real Dovecot, so that an upgrade of imapclient or Python that
changes one fails a test, not production.
"""

from __future__ import annotations

import io
from typing import Any

from imapclient import IMAPClient


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


def silence_imaplib_debug(client: IMAPClient) -> None:
    """imapclient sets imaplib's debug level to 5, at which imaplib formats the repr of every
    response, whole messages included, before the logger drops it; level 0 formats nothing."""
    client._imap.debug = 0
