"""Fresh access tokens for IMAP and SMTP, from the account's token row shared by all workers.

``TokenSource.access_token()`` answers from memory while the token is not due, else from the
database when another process has refreshed it, else refreshes it itself. A token is due a
little before it expires (a quarter of its lifetime, at most five minutes), so a refresh happens
before a failure, not after one.

Serialisation: a refresh is one transaction that holds the account's row locked (PostgreSQL:
``SELECT ... FOR UPDATE``; SQLite: the ``BEGIN IMMEDIATE`` write lock), reads it again, and
only calls the token endpoint if nobody refreshed meanwhile. So N workers, or N containers
sharing PostgreSQL, due at the same moment, make one token request; the others wait for the lock
and take its result. A rotated refresh token is written in the same commit that stores the new
access token: the old one stays stored until the new one is.

No storm: after a failed token request none is made before ``next_attempt_at`` (refused: one
minute doubling to an hour; unavailable: 5 s doubling to 5 minutes), whichever process asks;
until then the stored reason is raised again without a request.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, select, update
from tenacity import wait_exponential

from emailops.auth.crypto import TokenCipher
from emailops.auth.errors import (
    LOGIN_FIX,
    OAuth2Error,
    OAuth2RefusedError,
    OAuth2UnavailableError,
)
from emailops.auth.sasl import sasl_strings
from emailops.auth.token_endpoint import TokenEndpoint, TokenResponse
from emailops.backoff import delay_seconds
from emailops.clock import Clock, utc_now
from emailops.config import OAuth2Config, OAuth2Flow
from emailops.store import account_state
from emailops.store.account_state import Event
from emailops.store.database import reading
from emailops.store.dialect import insert_unless_present, locking
from emailops.store.schema import oauth2_tokens

log = structlog.get_logger(component="auth")

# Refresh this long before expiry at most (a quarter of the token's lifetime when shorter).
REFRESH_MARGIN = timedelta(minutes=5)
# A token the server refuses within this long after it was issued is not refreshed again: the
# fault is elsewhere (permissions, scopes), and refreshing would only add token requests.
FRESH_TOKEN_AGE = timedelta(seconds=60)
REFUSED_BACKOFF = (timedelta(seconds=60), timedelta(hours=1))
UNAVAILABLE_BACKOFF = (timedelta(seconds=5), timedelta(minutes=5))

REFUSED = "refused"
UNAVAILABLE = "unavailable"


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def backoff(failures: int, kind: str) -> timedelta:
    first, cap = REFUSED_BACKOFF if kind == REFUSED else UNAVAILABLE_BACKOFF
    strategy = wait_exponential(multiplier=first.total_seconds(), max=cap.total_seconds())
    return timedelta(seconds=delay_seconds(strategy, failures))


@dataclass(frozen=True)
class TokenStatus:
    """What ``emailops auth status`` shows: never a token."""

    account: str
    flow: str
    # Tokens are stored and the authorization server has not refused them since.
    signed_in: bool
    access_expires_at: datetime | None
    refreshed_at: datetime | None
    failures: int
    next_attempt_at: datetime | None
    last_error_kind: str | None
    last_error: str | None
    last_error_at: datetime | None


@dataclass(frozen=True)
class _Cached:
    token: str = field(repr=False)
    expires_at: datetime
    refreshed_at: datetime


class TokenSource:
    """Access tokens of one account (``config.account``). One per process; thread-safe.

    ``on_secret(source, secrets)`` is called before a secret is used, with all that one source
    of the account holds now (the access token with the SASL strings that carry it, the refresh
    token, the configured refresh token, the client secret); the caller masks them. A source's
    new secrets replace its old ones: what is masked depends on the sources, not on the refreshes.
    """

    def __init__(
        self,
        engine: Engine,
        config: OAuth2Config,
        *,
        endpoint: TokenEndpoint | None = None,
        clock: Clock = utc_now,
        on_secret: Callable[[str, tuple[str, ...]], None] = lambda _source, _secrets: None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.endpoint = endpoint or TokenEndpoint(config)
        self.cipher = TokenCipher(config.token_keys)
        self.clock = clock
        self.on_secret = on_secret
        self._lock = threading.Lock()
        self._cached: _Cached | None = None
        if config.initial_refresh_token:
            on_secret(self._source("configured refresh token"), (config.initial_refresh_token,))
        if config.client_secret:
            on_secret(self._source("client secret"), (config.client_secret,))

    # -- the token -----------------------------------------------------------------------------

    def access_token(self, rejected: str | None = None) -> str:
        with self._lock:
            now = self.clock()
            cached = self._cached
            if cached is not None and cached.token != rejected and not _due(cached, now):
                return cached.token
            with reading(self.engine) as conn:
                row = self._row(conn)
            token = self._usable(row, now, rejected)
            if token is not None:
                return token
            return self._refresh(rejected)

    def _refresh(self, rejected: str | None) -> str:
        failure: OAuth2Error | None = None
        with self.engine.begin() as conn:
            self._ensure_row(conn)
            row = self._row(conn, lock=True)
            assert row is not None
            now = self.clock()
            token = self._usable(row, now, rejected)
            if token is not None:
                return token  # another worker refreshed while this one waited for the lock
            if rejected is not None and self._is_fresh(row, rejected, now):
                return rejected
            if row.next_attempt_at is not None and now < row.next_attempt_at:
                raise _stored_error(row)
            if self.config.flow is OAuth2Flow.REFRESH_TOKEN and row.refresh_token is None:
                raise OAuth2RefusedError(f"no OAuth2 sign-in stored for {self.config.account}: {LOGIN_FIX}")
            try:
                response = self._request(row)
            except OAuth2RefusedError as exc:
                failure = exc
                self._record_failure(conn, row, REFUSED, exc, now)
            except OAuth2UnavailableError as exc:
                failure = exc
                self._record_failure(conn, row, UNAVAILABLE, exc, now)
            else:
                return self._store(conn, response, now, rotated_from=row.refresh_token)
        assert failure is not None
        raise failure

    def _request(self, row: Any) -> TokenResponse:
        if self.config.flow is OAuth2Flow.CLIENT_CREDENTIALS:
            return self.endpoint.client_credentials()
        return self.endpoint.refresh(self.cipher.decrypt(row.refresh_token))

    def _store(
        self, conn: Connection, response: TokenResponse, now: datetime, *, rotated_from: bytes | None
    ) -> str:
        """Store a token answer; ``rotated_from`` is the refresh token it replaces (None: a login)."""
        self._announce(response)
        expires_at = now + timedelta(seconds=response.expires_in)
        values: dict[str, Any] = {
            "flow": self.config.flow.value,
            "access_token": self.cipher.encrypt(response.access_token),
            "access_expires_at": expires_at,
            "refreshed_at": now,
            "failures": 0,
            "next_attempt_at": None,
            "last_error_kind": None,
            "last_error": None,
            "last_error_at": None,
            "updated_at": now,
        }
        rotated = response.refresh_token is not None and self.config.flow is OAuth2Flow.REFRESH_TOKEN
        if rotated:
            assert response.refresh_token is not None
            values["refresh_token"] = self.cipher.encrypt(response.refresh_token)
        conn.execute(
            update(oauth2_tokens).where(oauth2_tokens.c.account == self.config.account).values(values)
        )
        self._cached = _Cached(response.access_token, expires_at, now)
        if rotated_from is None and self.config.flow is OAuth2Flow.REFRESH_TOKEN:
            log.info("oauth2 sign-in stored", account=self.config.account, expires_in=response.expires_in)
        else:
            log.info(
                "oauth2 access token refreshed",
                account=self.config.account,
                flow=self.config.flow.value,
                expires_in=response.expires_in,
                refresh_token_rotated=rotated,
            )
        return response.access_token

    def _record_failure(
        self, conn: Connection, row: Any, kind: str, error: OAuth2Error, now: datetime
    ) -> None:
        failures = (row.failures or 0) + 1
        delay = backoff(failures, kind)
        conn.execute(
            update(oauth2_tokens)
            .where(oauth2_tokens.c.account == self.config.account)
            .values(
                failures=failures,
                next_attempt_at=now + delay,
                last_error_kind=kind,
                last_error=str(error),
                last_error_at=now,
                updated_at=now,
            )
        )
        log.warning(
            "oauth2 token request failed",
            account=self.config.account,
            kind=kind,
            error=str(error),
            failures=failures,
            next_request_in_seconds=delay.total_seconds(),
        )

    # -- login, status, logout ---------------------------------------------------------------------

    def store_login(self, response: TokenResponse) -> None:
        """Store the tokens of a completed device-code login (replacing any stored sign-in)."""
        if response.refresh_token is None:
            raise OAuth2RefusedError(
                "the authorization server issued no refresh token: the scopes must include offline "
                "access (Microsoft: offline_access)"
            )
        with self._lock, self.engine.begin() as conn:
            self._ensure_row(conn)
            self._row(conn, lock=True)
            now = self.clock()
            conn.execute(
                update(oauth2_tokens)
                .where(oauth2_tokens.c.account == self.config.account)
                .values(
                    flow=self.config.flow.value,
                    refresh_token=self.cipher.encrypt(response.refresh_token),
                    # The login wins over a refresh token given in the environment.
                    seed_fingerprint=self._seed_fingerprint(),
                )
            )
            self._store(conn, response, now, rotated_from=None)
            # No longer refused: the workers try the account's sign-in at once, not at its next
            # slow retry.
            account_state.record(conn, self.config.account, Event.NEW_GRANT)

    def status(self) -> TokenStatus | None:
        with reading(self.engine) as conn:
            row = self._row(conn)
        if row is None:
            return None
        # A stored sign-in that the authorization server refused is not one: it needs a new login.
        signed_in = row.last_error_kind != REFUSED and (
            row.access_token is not None
            if self.config.flow is OAuth2Flow.CLIENT_CREDENTIALS
            else row.refresh_token is not None
        )
        return TokenStatus(
            account=row.account,
            flow=row.flow,
            signed_in=signed_in,
            access_expires_at=row.access_expires_at,
            refreshed_at=row.refreshed_at,
            failures=row.failures or 0,
            next_attempt_at=row.next_attempt_at,
            last_error_kind=row.last_error_kind,
            last_error=row.last_error,
            last_error_at=row.last_error_at,
        )

    def logout(self) -> bool:
        """Forget the stored tokens; True if there were any. The configured refresh token, if
        any, is not used again (its fingerprint stays)."""
        with self._lock, self.engine.begin() as conn:
            self._cached = None
            result = conn.execute(
                update(oauth2_tokens)
                .where(oauth2_tokens.c.account == self.config.account)
                .values(
                    refresh_token=None,
                    access_token=None,
                    access_expires_at=None,
                    failures=0,
                    next_attempt_at=None,
                    last_error_kind=None,
                    last_error=None,
                    last_error_at=None,
                    updated_at=self.clock(),
                )
            )
            return result.rowcount > 0

    # -- rows ----------------------------------------------------------------------------------

    def _row(self, conn: Connection, *, lock: bool = False) -> Any:
        query = select(oauth2_tokens).where(oauth2_tokens.c.account == self.config.account)
        if lock:
            query = locking(conn, query)
        return conn.execute(query).first()

    def _seed_fingerprint(self) -> str | None:
        seed = self.config.initial_refresh_token
        return fingerprint(seed) if seed else None

    def _ensure_row(self, conn: Connection) -> None:
        """The account's row exists (so that it can be locked), seeded with the configured refresh
        token; a configured refresh token not seen before replaces the stored one."""
        now = self.clock()
        seed = self.config.initial_refresh_token
        seed_print = self._seed_fingerprint()
        conn.execute(
            insert_unless_present(conn, oauth2_tokens, ["account"]).values(
                account=self.config.account,
                flow=self.config.flow.value,
                refresh_token=self.cipher.encrypt(seed) if seed else None,
                seed_fingerprint=seed_print,
                failures=0,
                updated_at=now,
            )
        )
        if seed is None:
            return
        row = self._row(conn, lock=True)
        if row.seed_fingerprint != seed_print:
            conn.execute(
                update(oauth2_tokens)
                .where(oauth2_tokens.c.account == self.config.account)
                .values(
                    refresh_token=self.cipher.encrypt(seed),
                    seed_fingerprint=seed_print,
                    access_token=None,
                    access_expires_at=None,
                    failures=0,
                    next_attempt_at=None,
                    updated_at=now,
                )
            )
            self._cached = None

    def _usable(self, row: Any, now: datetime, rejected: str | None) -> str | None:
        """The row's access token when it is not due and not the rejected one (cached)."""
        if row is None or row.access_token is None or row.access_expires_at is None:
            return None
        if row.flow != self.config.flow.value:
            return None
        token = self.cipher.decrypt(row.access_token)
        cached = _Cached(token, row.access_expires_at, row.refreshed_at or now)
        if token == rejected or _due(cached, now):
            return None
        if self._cached is None or self._cached.token != token:
            self._announce_access(token)
        self._cached = cached
        return token

    def _is_fresh(self, row: Any, rejected: str, now: datetime) -> bool:
        if row.access_token is None or row.refreshed_at is None:
            return False
        return self.cipher.decrypt(row.access_token) == rejected and now - row.refreshed_at < FRESH_TOKEN_AGE

    def _announce(self, response: TokenResponse) -> None:
        if response.refresh_token:
            self.on_secret(self._source("refresh token"), (response.refresh_token,))
        self._announce_access(response.access_token)

    def _announce_access(self, token: str) -> None:
        self.on_secret(self._source("access token"), (token, *sasl_strings(self.config.username, token)))

    def _source(self, kind: str) -> str:
        """The name of one of the account's sources of secrets, for ``on_secret``."""
        return f"oauth2 {kind} of {self.config.account}"


def _due(cached: _Cached, now: datetime) -> bool:
    lifetime = cached.expires_at - cached.refreshed_at
    margin = min(REFRESH_MARGIN, lifetime / 4)
    return now >= cached.expires_at - margin


def _stored_error(row: Any) -> OAuth2Error:
    after = row.next_attempt_at.isoformat(timespec="seconds")
    message = f"{row.last_error} (no new token request before {after})"
    if row.last_error_kind == UNAVAILABLE:
        return OAuth2UnavailableError(message)
    return OAuth2RefusedError(message)
