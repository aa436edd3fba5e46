"""A lazily opened IMAP connection for the changes rules ask for (flag, move, drafts, Sent copies).

Separate from the watchers' connections, which sit in IDLE. A failure drops the connection; the next
use reconnects. Callers run these changes only after the database commit that decided them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from imapclient import IMAPClient

from emailops.config import ServerConfig
from emailops.imap.connection import close_quietly, connect
from emailops.imap.watcher import CONNECTION_ERRORS


class MailboxSession:
    def __init__(
        self, server: ServerConfig, connector: Callable[[ServerConfig], IMAPClient] = connect
    ) -> None:
        self.server = server
        self.connector = connector
        self._client: IMAPClient | None = None
        self._selected: str | None = None

    def client(self, folder: str | None = None) -> IMAPClient:
        """The connection, with ``folder`` selected read-write when given."""
        if self._client is None:
            self._client = self.connector(self.server)
            self._selected = None
        if folder is not None and folder != self._selected:
            self._client.select_folder(folder)
            self._selected = folder
        elif folder is not None:
            # A session sees messages that arrived since its SELECT only after the server told it:
            # a UID STORE to a message it does not know yet is silently ignored (RFC 3501 6.4.8).
            self._client.noop()
        return self._client

    def drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                self._client.shutdown()
        self._client = None
        self._selected = None

    def close(self) -> None:
        if self._client is not None:
            close_quietly(self._client)
        self._client = None
        self._selected = None
