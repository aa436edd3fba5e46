"""Opening an authenticated IMAP connection the configured way, sharing one between polled
folders, and the reconnect policy.

TLS certificates are verified against the system CAs plus ``ca_file``; STARTTLS that the server does
not offer is an error (no silent plaintext); every socket operation has a timeout and is a
network wait (``emailops.network_waits``): a worker waiting on a frozen server is not taken for hung.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import imapclient
from imapclient.exceptions import IMAPClientError, LoginError
from tenacity import wait_exponential_jitter

from emailops.auth.errors import OAuth2Error, OAuth2UnavailableError
from emailops.auth.sasl import (
    OAUTHBEARER,
    NoOAuth2Mechanism,
    TokenRefused,
    TokenRefusedAgain,
    choose_mechanism,
    sign_in_with_one_refresh,
)
from emailops.backoff import delay_seconds
from emailops.config import AccessTokens, ServerConfig, TlsSecurity
from emailops.imap.errors import (
    ImapAuthError,
    ImapError,
    ImapFolderMissingError,
    ImapNoConnectionSlotError,
    ImapSecurityError,
    ImapTooManyConnectionsError,
    ImapTransientError,
    classify_login_failure,
)
from emailops.imap.imaplib_internals import WaitMarkingIMAPClient, silence_imaplib_debug
from emailops.tls import verifying_context


def connect(config: ServerConfig) -> imapclient.IMAPClient:
    """A logged-in client, or an ``ImapError`` subclass saying what kind of failure it was."""
    try:
        client = _open(config)
    except ssl.SSLError as exc:
        raise ImapSecurityError(f"TLS with {config.host}:{config.port} failed: {exc}") from exc
    except (OSError, IMAPClientError) as exc:
        raise ImapTransientError(f"cannot connect to {config.host}:{config.port}: {exc}") from exc
    try:
        if config.tokens is not None:
            _oauth2_login(client, config, config.tokens)
        else:
            client.login(config.username, config.password)
    except ImapError:
        _drop_socket(client)
        raise
    except LoginError as exc:
        _drop_socket(client)
        raise classify_login_failure(str(exc)) from None
    except TimeoutError as exc:
        # No answer is no refusal, whatever the text: never taken for refused credentials.
        _drop_socket(client)
        raise ImapTransientError(f"login to {config.host}:{config.port} got no answer: {exc}") from exc
    except (OSError, IMAPClientError) as exc:
        # A connection limit is often told by a BYE right at login.
        _drop_socket(client)
        raise classify_login_failure(f"login to {config.host} interrupted: {exc}") from exc
    # Aware UTC datetimes for INTERNALDATE, not the local time of the machine.
    client.normalise_times = False
    if not logging.getLogger("imapclient.imaplib").isEnabledFor(logging.DEBUG):
        # imaplib's formatting of every response at imapclient's debug level was a third of the
        # cost of a bulk fetch. With DEBUG logging on, the protocol lines are still logged.
        silence_imaplib_debug(client)
    try:
        if client.has_capability("CONDSTORE"):
            # Makes the server report HIGHESTMODSEQ and MODSEQ (RFC 7162 section 3.1).
            client.enable("CONDSTORE")
    except (OSError, IMAPClientError) as exc:
        logout_quietly(client)
        raise ImapTransientError(f"connection to {config.host} lost after login: {exc}") from exc
    return client


def _oauth2_login(client: imapclient.IMAPClient, config: ServerConfig, tokens: AccessTokens) -> None:
    """SASL XOAUTH2 or OAUTHBEARER, whichever the server offers; a refused token is replaced by a
    newer one once (the server may have revoked it early), then the refusal is an ``ImapAuthError``
    that says what to check."""
    offered = [
        capability.decode("ascii", "replace")[5:]
        for capability in client.capabilities()
        if capability.upper().startswith(b"AUTH=")
    ]
    try:
        mechanism = choose_mechanism(offered)
    except NoOAuth2Mechanism as exc:
        raise ImapAuthError(f"{config.host}: {exc}") from None

    def sign_in(token: str) -> None:
        try:
            _authenticate(client, mechanism, config.username, token)
        except LoginError as exc:
            refusal = classify_login_failure(str(exc))
            if not isinstance(refusal, ImapAuthError):
                raise refusal from None
            raise TokenRefused(str(exc)) from None

    try:
        sign_in_with_one_refresh(lambda rejected: _access_token(tokens, rejected), sign_in)
    except TokenRefusedAgain as exc:
        what = "a freshly issued" if exc.second is None else "a newly refreshed"
        said = "" if exc.second is None else f": {exc.second.detail}"
        raise ImapAuthError(
            f"{config.host} refused {what} OAuth2 access token ({mechanism}{said}): check that the "
            "app may use IMAP for this mailbox (permissions, EMAIL_OAUTH2_SCOPES, EMAIL_USERNAME)"
        ) from None


def _access_token(tokens: AccessTokens, rejected: str | None = None) -> str:
    try:
        return tokens.access_token(rejected)
    except OAuth2UnavailableError as exc:
        raise ImapTransientError(f"no OAuth2 access token: {exc}") from None
    except OAuth2Error as exc:
        raise ImapAuthError(f"OAuth2 sign-in refused: {exc}") from None


def _authenticate(client: imapclient.IMAPClient, mechanism: str, user: str, token: str) -> None:
    if mechanism == OAUTHBEARER:
        client.oauthbearer_login(user, token)
    else:
        client.oauth2_login(user, token)


def _open(config: ServerConfig) -> imapclient.IMAPClient:
    timeout = config.timeout_seconds
    if config.security is TlsSecurity.SSL:
        return WaitMarkingIMAPClient(
            config.host, config.port, ssl=True, ssl_context=verifying_context(config.ca_file), timeout=timeout
        )
    client = WaitMarkingIMAPClient(config.host, config.port, ssl=False, timeout=timeout)
    if config.security is TlsSecurity.STARTTLS:
        if not client.has_capability("STARTTLS"):
            _drop_socket(client)
            raise ImapSecurityError(
                f"{config.host}:{config.port} does not offer STARTTLS; refusing to log in in plaintext "
                "(set EMAIL_IMAP_SECURITY=ssl for implicit TLS, or =none only on a trusted network)"
            )
        client.starttls(verifying_context(config.ca_file))
    return client


def _drop_socket(client: imapclient.IMAPClient) -> None:
    """Close the socket without a word to the server (for a connection that is broken or unwanted)."""
    with contextlib.suppress(OSError, IMAPClientError):
        client.shutdown()


def logout_quietly(client: imapclient.IMAPClient) -> None:
    """Log out, or just drop the socket when the connection is already broken."""
    try:
        client.logout()
    except (TimeoutError, OSError, IMAPClientError):
        _drop_socket(client)


class SharedConnection:
    """One logged-in connection that several polled folders use in turn (each pass SELECTs its
    folder and releases it), so that a worker watching many folders stays within the server's
    connection limit: only folders watched with IDLE need a connection of their own.

    ``open`` connects when there is no live connection (raising ``ImapError`` like ``connect``);
    folders connecting at once on threads (``background_connect``) get the one connection.
    ``drop(client)`` forgets a connection found broken, unless a user has already replaced it.
    """

    def __init__(
        self, server: ServerConfig, connector: Callable[[ServerConfig], imapclient.IMAPClient] = connect
    ) -> None:
        self.server = server
        self.connector = connector
        self.client: imapclient.IMAPClient | None = None
        self._opening = threading.Lock()

    def open(self) -> imapclient.IMAPClient:
        with self._opening:
            if self.client is None:
                self.client = self.connector(self.server)
            return self.client

    def drop(self, client: imapclient.IMAPClient) -> None:
        if client is self.client:
            _drop_socket(client)
            self.client = None

    def close(self) -> None:
        if self.client is not None:
            logout_quietly(self.client)
            self.client = None


@dataclass
class ReconnectPolicy:
    """When to try connecting again after ``failures`` consecutive failures of a kind.

    Transient trouble: capped exponential backoff with jitter (1 s doubling to 60 s). A connection
    limit: at least 30 s, up to 5 minutes. Rejected credentials: 1 minute doubling to 1 hour, so a
    wrong password does not get the account locked by the provider. A folder missing on the
    server: 1 minute doubling to 15 minutes, so that it is indexed soon after someone creates it.
    No free connection slot of the account: 2 s doubling to 20 s (slots come free within a lease).
    """

    transient = wait_exponential_jitter(multiplier=1, max=60, jitter=1)
    too_many = wait_exponential_jitter(multiplier=30, max=300, jitter=5)
    auth = wait_exponential_jitter(multiplier=60, max=3600, jitter=10)
    folder_missing = wait_exponential_jitter(multiplier=60, max=900, jitter=10)
    no_slot = wait_exponential_jitter(multiplier=2, max=20, jitter=2)

    def delay(self, error: ImapError, failures: int) -> float:
        if isinstance(error, ImapAuthError):
            strategy = self.auth
        elif isinstance(error, ImapFolderMissingError):
            strategy = self.folder_missing
        elif isinstance(error, ImapTooManyConnectionsError):
            strategy = self.too_many
        elif isinstance(error, ImapNoConnectionSlotError):
            strategy = self.no_slot
        else:
            strategy = self.transient
        return delay_seconds(strategy, failures)
