"""How an IMAP failure is classified decides how soon to try again."""

from __future__ import annotations

import socket

from imapclient.exceptions import IMAPClientError

# Failures that mean "the connection is gone": drop it and reconnect.
CONNECTION_ERRORS = (OSError, socket.timeout, IMAPClientError, EOFError)


class ImapError(Exception):
    """Base class for failures talking to the IMAP server.

    ``kind`` names the class of failure in metrics and in the worker's status (the healthcheck
    turns it into its ``error_type``): a fixed set, whatever the server said.
    """

    kind = "error"


class ImapTransientError(ImapError):
    """Network trouble, a timeout, a dropped connection or a server restart: retry with backoff."""

    kind = "connection"


class ImapTooManyConnectionsError(ImapTransientError):
    """The server refused because of a connection limit: back off longer before trying again."""

    kind = "too_many_connections"


class ImapNoConnectionSlotError(ImapTransientError):
    """Every one of the account's connection slots (IMAP_MAX_CONNECTIONS) is held, by this or other
    workers: nothing was sent to the server; tried again soon, as slots are given back."""

    kind = "connection_budget"


class ImapAuthError(ImapError):
    """The credentials were rejected. Retried slowly, so that the provider does not lock the account."""

    kind = "auth"


class ImapFolderMissingError(ImapError):
    """A configured folder does not exist on the server (a typo in EMAIL_FOLDERS, or deleted).

    Not a connection failure: reconnecting at once would not help, so it is checked again slowly."""

    kind = "folder_missing"


class ImapSecurityError(ImapError):
    """TLS could not be established as configured (e.g. STARTTLS not offered, certificate refused).

    Never answered by falling back to plaintext."""

    kind = "tls"


_TOO_MANY = ("too many", "maximum number of connections", "[limit]", "connection limit")
_AUTH = ("authenticationfailed", "authentication failed", "invalid credentials", "login failed", "[auth")


# RFC 5530: the server cannot check the credentials now (its authentication backend is down).
_UNAVAILABLE = "[unavailable]"


def classify_login_failure(message: str) -> ImapError:
    lowered = message.lower()
    if _UNAVAILABLE in lowered:
        return ImapTransientError(message)
    if any(marker in lowered for marker in _TOO_MANY):
        return ImapTooManyConnectionsError(message)
    if any(marker in lowered for marker in _AUTH):
        return ImapAuthError(message)
    return ImapTransientError(message)
