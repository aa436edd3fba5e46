"""Plain configuration values the domain library takes.

``prod.runtime_settings.RuntimeSettings`` reads and validates the environment and builds these;
the domain code never looks at the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class TlsSecurity(StrEnum):
    """How a connection is protected: implicit TLS, STARTTLS (fails closed), or plaintext."""

    SSL = "ssl"
    STARTTLS = "starttls"
    NONE = "none"


class AccessTokens(Protocol):
    """Where OAuth2 access tokens come from (``emailops.auth.token_source.TokenSource``)."""

    def access_token(self, rejected: str | None = None) -> str:
        """A valid access token; with ``rejected`` (a token the server just refused), a newer one
        when one can be had, else ``rejected`` itself. Raises ``emailops.auth.errors.OAuth2Error``."""
        ...


@dataclass(frozen=True)
class ServerConfig:
    """One mail server endpoint with the account's credentials.

    ``password`` is a plain ``str`` here on purpose: it is only handed to the protocol library.
    Its ``repr`` is masked so that it never reaches a log line or a traceback by accident.
    With ``tokens`` set, the account signs in with OAuth2 (XOAUTH2 / OAUTHBEARER) and
    ``password`` is unused.
    """

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    security: TlsSecurity
    ca_file: Path | None = None
    timeout_seconds: float = 30.0
    tokens: AccessTokens | None = field(default=None, repr=False, compare=False)


class OAuth2Flow(StrEnum):
    """Delegated sign-in of a person (device-code login, then refresh tokens), or app-only
    access with the client's own credentials (Microsoft's client credentials grant)."""

    REFRESH_TOKEN = "refresh_token"  # noqa: S105 (a grant name)
    CLIENT_CREDENTIALS = "client_credentials"


@dataclass(frozen=True)
class OAuth2Config:
    """How the account gets OAuth2 access tokens. Secrets have masked ``repr``s.

    ``token_keys``: Fernet keys; tokens are stored encrypted with the first and read with any
    (so a key can be rotated by putting the new one first).
    ``initial_refresh_token``: a refresh token obtained elsewhere; it seeds the store, and a
    different value given later replaces the stored one once.
    """

    account: str
    username: str
    provider: str
    flow: OAuth2Flow
    token_url: str
    device_url: str | None
    scopes: tuple[str, ...]
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    initial_refresh_token: str | None = field(default=None, repr=False)
    token_keys: tuple[str, ...] = field(default=(), repr=False)
    timeout_seconds: float = 30.0
    # The authorization endpoint of the authorization-code flow (the console's Reconnect).
    authorize_url: str | None = None


@dataclass(frozen=True)
class SyncConfig:
    """What to index and how."""

    account: str
    folders: tuple[str, ...] = ("INBOX",)
    use_idle: bool = True
    # Folders a worker watches with IDLE, each on a connection of its own (the first ones of
    # ``folders`` it holds); the others are polled in turn over one shared connection, so that
    # the account's connection limit is kept (Dovecot: 10 per user and address, Gmail: 15).
    idle_folders: int = 4
    # The account's IMAP connections, counted over every worker and container (slots in the
    # index database); a worker IDLEs on fewer folders when its share of them is smaller.
    max_connections: int = 5
    poll_interval_seconds: float = 60.0
    # IDLE is re-issued well before the 29 minutes of RFC 2177.
    idle_renew_seconds: float = 600.0
    # A message larger than this is indexed from its headers and a bounded part of its text.
    max_message_bytes: int = 25 * 1024 * 1024
    # The text kept for the full-text index, per message.
    max_body_chars: int = 200_000
    fetch_batch_messages: int = 500
    fetch_batch_bytes: int = 16 * 1024 * 1024
    # Without CONDSTORE, flag changes and expunges are found by a periodic full reconcile.
    reconcile_interval_seconds: float = 300.0
    # Passes that may fail on one new message (it raises, or hangs or kills the worker) before it
    # is quarantined and the folder goes on without it.
    max_attempts_per_message: int = 3
    cache_dir: Path | None = None
    cache_max_bytes: int = 2 * 1024**3


@dataclass(frozen=True)
class SignInLimits:
    """How fast a worker's IMAP logins may come (see ``emailops.imap.connection_budget``)."""

    # Logins to one IMAP host per second, counted over every worker and container; 0: no limit.
    logins_per_second: float = 0.0
    # The first login of each account in a worker waits a random part of this (spreads a start).
    startup_jitter_seconds: float = 0.0


@dataclass(frozen=True)
class LlmConfig:
    """The OpenAI-compatible chat-completions endpoint that writes model replies (``llm_prompt``).

    ``api_key`` is masked in ``repr`` like the password; it only goes into the Authorization header.
    """

    base_url: str
    api_key: str = field(default="", repr=False)
    model: str = ""
    # Bound on one HTTP call, connection to last byte (kept well below the heartbeat timeout).
    timeout_seconds: float = 30.0
    # The message text that leaves the machine: {body} is cut to this many characters.
    max_input_chars: int = 8000
    # Calls by all workers of the account in any hour; over it, jobs wait.
    max_requests_per_hour: int = 100
    # Default for a rule without llm_max_tokens.
    max_tokens: int = 800
    # Tries of one job (timeouts, 429, 5xx), then it fails with the reason.
    max_attempts: int = 5
    # A claim older than this is from a worker that died mid-call: the job is tried again.
    claim_timeout_seconds: float = 120.0
    # Wait before the next try after a timeout or a 5xx: doubled per attempt, capped (a 429's
    # Retry-After replaces it).
    backoff_initial_seconds: float = 30.0
    backoff_max_seconds: float = 1800.0
    # Ask for the answer as server-sent events (a proxy that cuts idle connections sees bytes flow).
    stream: bool = False


@dataclass(frozen=True)
class ReplyConfig:
    """How automatic replies are sent."""

    from_address: str
    # The account's name: rules with match.accounts apply only to the accounts they name.
    account_name: str = ""
    own_addresses: tuple[str, ...] = ()
    rules_file: Path | None = None
    dry_run: bool = False
    never_reply_to: tuple[str, ...] = ()
    max_replies_per_sender_per_day: int = 3
    max_replies_per_hour: int = 100
    send_max_attempts: int = 5
    save_sent_copy: bool = False
    sent_folder: str = "Sent"
    drafts_folder: str = "Drafts"
    # A message whose rules raise, or do not finish within the claim timeout (its worker hung and
    # was killed, or died), is tried this many times in all, then quarantined.
    rules_max_attempts: int = 3
    rules_claim_timeout_seconds: float = 120.0
    # None: no model configured; a rule with llm_prompt then records nothing (a configuration error).
    llm: LlmConfig | None = None
