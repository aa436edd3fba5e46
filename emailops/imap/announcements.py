"""Changes the server announced that imapclient does not hand over.

A server tells of mail that arrives during one of our commands in that command's answer, or right
after it. imaplib keeps such untagged answers in ``untagged_responses`` where no later command
looks, or has already read them into its buffer, where ``IMAPClient.idle_check()`` (which waits on
the socket) never looks. Both are checked before and while idling, or a message that arrived during
a sync pass would wait for the next poll. These are the only reads of imaplib's state below
imapclient besides the bulk fetch (``bulk_fetch.py``), both through ``imaplib_internals``.
"""

from __future__ import annotations

import select
import ssl
from enum import Enum

from imapclient import IMAPClient

from emailops.imap.imaplib_internals import read_ahead_buffer, set_aside_answers

# Untagged answers that tell of a change in the selected folder.
CHANGE_ANSWERS = ("EXISTS", "EXPUNGE", "RECENT", "FETCH", "VANISHED")


def forget_unsolicited(client: IMAPClient) -> bool:
    """Drop the change announcements imaplib set aside during our own commands; True if any."""
    stash = set_aside_answers(client)
    return bool([stash.pop(kind) for kind in CHANGE_ANSWERS if kind in stash])


class PendingInput(Enum):
    """What waits to be read on a connection."""

    NOTHING = "nothing"
    DATA = "data"
    # The server closed the connection (with or without BYE); a closed socket is always readable.
    CLOSED = "closed"


def pending_input(client: IMAPClient) -> PendingInput:
    """What the server has sent and we have not read yet: in imaplib's read-ahead buffer, or on
    the socket. Never blocks.

    A non-blocking read of a plaintext socket with nothing to read comes back empty from the
    buffered reader, as end of file does: only a socket that polls readable and still reads
    empty is closed. (Over TLS, "nothing yet" raises SSLWantReadError instead.)"""
    sock = client.socket()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    readable = bool(poller.poll(0))
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        peeked = read_ahead_buffer(client).peek(1)
    except (BlockingIOError, ssl.SSLWantReadError):
        return PendingInput.NOTHING
    except OSError:
        return PendingInput.CLOSED  # reset by the peer
    finally:
        sock.settimeout(timeout)
    if peeked:
        return PendingInput.DATA
    return PendingInput.CLOSED if readable else PendingInput.NOTHING
