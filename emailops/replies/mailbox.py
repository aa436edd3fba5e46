"""A lazily opened IMAP connection for the changes rules ask for (flag, move, drafts, Sent copies).

Separate from the watchers' connections, which sit in IDLE. A failure drops the connection; the next
use reconnects. A connection left unused for a while is checked with a NOOP before it is used,
because servers close idle connections (Dovecot after 30 minutes, NAT tables sooner) and the
change that found out would otherwise be lost. Callers run these changes only after the database
commit that decided them.

The connection is opened with the account's other connections (``AccountConnections.connect``,
given as ``connector``): it takes one of the account's slots (IMAP_MAX_CONNECTIONS) first, and
raises ``ImapNoConnectionSlotError`` when none is free; its caller makes the change later. The
connection is closed once unused for ``IDLE_CLOSE_SECONDS`` (``close_if_unused``, called by the
account's watch each loop iteration, which then gives its slot back): every worker serves every
account's rules and outbox, and their sessions kept open would hold every slot.

imaplib keeps every untagged answer that no command claims (the ``EXISTS`` and ``RECENT`` each
NOOP brings while mail arrives) in a dict it empties only on SELECT, so ``client()`` drops them:
the session acts on UIDs and needs none of them, and kept they grew by two entries per message
answered, for as long as the connection lived (issue 14).

A UID names a message only within one UIDVALIDITY of its folder: a folder deleted and created again
numbers other messages from 1. ``client_for_uids`` selects the folder and gives the connection only
if the UIDVALIDITY that SELECT reports is the one the caller's UIDs were read under.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from imapclient import IMAPClient

from emailops.config import ServerConfig
from emailops.imap.announcements import forget_unsolicited
from emailops.imap.connection import connect, logout_quietly
from emailops.imap.errors import CONNECTION_ERRORS


class FolderRecreated(Exception):
    """The folder's UIDVALIDITY is not the one a message was indexed under: its UIDs name other
    messages now, so nothing is done with them."""

    def __init__(self, folder: str, expected: int, current: int | None) -> None:
        super().__init__(
            f"folder {folder!r} has UIDVALIDITY {current}, not {expected}: it was recreated and its "
            "UIDs name other messages"
        )
        self.folder = folder
        self.expected = expected
        self.current = current


class MailboxSession:
    # Unused for longer than this, the connection is checked (one NOOP) before it is used again
    # (when nobody called ``close_if_unused`` meanwhile).
    IDLE_CHECK_SECONDS = 60.0
    # Unused for this long, ``close_if_unused`` closes the connection, giving its slot back to the
    # account's watchers and other workers; a burst of mail (one change a message) reuses it.
    IDLE_CLOSE_SECONDS = 30.0

    def __init__(
        self,
        server: ServerConfig,
        connector: Callable[[ServerConfig], IMAPClient] = connect,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.connector = connector
        self.monotonic = monotonic
        self._client: IMAPClient | None = None
        self._selected: str | None = None
        # The UIDVALIDITY the SELECT of ``_selected`` reported.
        self._uidvalidity: int | None = None
        self._last_used = 0.0

    @property
    def open_client(self) -> IMAPClient | None:
        """The connection while it is open (it holds one of the account's slots), else None."""
        return self._client

    def close_if_unused(self) -> None:
        """Close the connection if unused for ``IDLE_CLOSE_SECONDS``."""
        if self._client is not None and self.monotonic() - self._last_used >= self.IDLE_CLOSE_SECONDS:
            self.close()

    def client(self, folder: str | None = None) -> IMAPClient:
        """The connection, with ``folder`` selected read-write when given; opened when closed
        (``ImapNoConnectionSlotError`` when the account has no slot free)."""
        now = self.monotonic()
        checked = False
        if self._client is not None and now - self._last_used > self.IDLE_CHECK_SECONDS:
            try:
                self._client.noop()
                checked = True
            except CONNECTION_ERRORS:
                self.drop()  # closed while unused: open a new one below
        self._last_used = now
        if self._client is None:
            self._client = self.connector(self.server)
            self._selected = None
            self._uidvalidity = None
        if folder is not None and folder != self._selected:
            self._select(self._client, folder)
        elif folder is not None and not checked:
            # A session sees messages that arrived since its SELECT only after the server told it:
            # a UID STORE to a message it does not know yet is silently ignored (RFC 3501 6.4.8).
            self._client.noop()
        forget_unsolicited(self._client)
        return self._client

    def client_for_uids(self, folder: str, uidvalidity: int) -> IMAPClient:
        """The connection with ``folder`` selected read-write, for UIDs read under ``uidvalidity``;
        raises ``FolderRecreated`` when the folder's UIDVALIDITY is another one.

        The folder is selected again each time (one round trip, as the NOOP would be): a selection
        made before the folder was recreated still shows the old folder."""
        client = self.client()
        try:
            self._select(client, folder)
        except CONNECTION_ERRORS:
            # Dovecot refuses (SERVERBUG) a SELECT in a session that had the folder open before it
            # was recreated; a new session opens it afresh. A SELECT touches no UID: safe to repeat.
            self.drop()
            client = self.client()
            self._select(client, folder)
        if self._uidvalidity != uidvalidity:
            raise FolderRecreated(folder, uidvalidity, self._uidvalidity)
        return client

    def _select(self, client: IMAPClient, folder: str) -> None:
        self._selected = None  # until the SELECT succeeded
        uidvalidity = client.select_folder(folder).get(b"UIDVALIDITY")
        self._selected = folder
        self._uidvalidity = int(uidvalidity) if uidvalidity is not None else None

    def drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                self._client.shutdown()
        self._client = None
        self._selected = None
        self._uidvalidity = None

    def close(self) -> None:
        if self._client is not None:
            logout_quietly(self._client)
        self._client = None
        self._selected = None
        self._uidvalidity = None
