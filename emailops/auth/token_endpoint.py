"""Requests to the authorization server: the refresh_token, client_credentials, device_code and
authorization_code (with PKCE, RFC 7636) grants (RFC 6749, RFC 8628), the device authorization
request and the address of an authorization request.

Authlib's requests client makes the token requests: it builds the grant bodies, authenticates
the client (``client_secret_post``, or none for a public client) and turns an error answer into
``OAuthError(error, description)``. It does no refreshing of its own here: when to refresh, and
who may, is decided by ``TokenSource`` under a database lock.

Failures are sorted for the caller: an answer that needs the operator (``invalid_grant``,
``invalid_client``, ...) raises ``OAuth2RefusedError``; no answer, a 5xx or
``temporarily_unavailable`` raises ``OAuth2UnavailableError``. No message carries a token, a
device code or the client secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests
from authlib.integrations.requests_client import OAuth2Session, OAuthError

from emailops.auth.errors import LOGIN_FIX, OAuth2RefusedError, OAuth2UnavailableError
from emailops.config import OAuth2Config, OAuth2Flow

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Error codes after which trying again later may work on its own.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
# When the server gives no lifetime, assume a short one: refreshing early is harmless.
DEFAULT_EXPIRES_IN = 600


@dataclass(frozen=True)
class TokenResponse:
    access_token: str = field(repr=False)
    expires_in: int
    # None when the server did not send one (no rotation: keep the stored token).
    refresh_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DeviceAuthorization:
    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    expires_in: int
    interval: int
    message: str | None = None


class DevicePending(Exception):
    """RFC 8628 ``authorization_pending`` / ``slow_down``: poll again (``slow_down``: slower)."""

    def __init__(self, slow_down: bool) -> None:
        super().__init__("slow_down" if slow_down else "authorization_pending")
        self.slow_down = slow_down


class TokenEndpoint:
    def __init__(self, config: OAuth2Config) -> None:
        self.config = config

    def _session(self, redirect_uri: str | None = None) -> OAuth2Session:
        cfg = self.config
        session = OAuth2Session(
            client_id=cfg.client_id,
            client_secret=cfg.client_secret,
            scope=" ".join(cfg.scopes) or None,
            token_endpoint_auth_method="client_secret_post" if cfg.client_secret else "none",
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
        )
        # No proxy or netrc credentials from the environment: the library reads no environment.
        session.trust_env = False
        return session

    def refresh(self, refresh_token: str) -> TokenResponse:
        with self._session() as session:
            return self._call(
                lambda: session.refresh_token(
                    self.config.token_url, refresh_token=refresh_token, timeout=self.config.timeout_seconds
                ),
                "refresh",
            )

    def client_credentials(self) -> TokenResponse:
        with self._session() as session:
            return self._call(
                lambda: session.fetch_token(
                    self.config.token_url,
                    grant_type="client_credentials",
                    timeout=self.config.timeout_seconds,
                ),
                "client credentials",
            )

    def authorization_url(self, redirect_uri: str, state: str, code_verifier: str) -> str:
        """Where to send the person's browser: the authorization endpoint with the client, the
        scopes, ``state`` and the S256 challenge of ``code_verifier``."""
        if not self.config.authorize_url:
            raise OAuth2RefusedError(
                "no authorization endpoint: set EMAIL_OAUTH2_AUTHORIZE_URL (an account: oauth2_authorize_url)"
            )
        with self._session(redirect_uri) as session:
            url, _ = session.create_authorization_url(
                self.config.authorize_url, state=state, code_verifier=code_verifier
            )
        return str(url)

    def authorization_code(self, code: str, redirect_uri: str, code_verifier: str) -> TokenResponse:
        with self._session(redirect_uri) as session:
            return self._call(
                lambda: session.fetch_token(
                    self.config.token_url,
                    grant_type="authorization_code",
                    code=code,
                    redirect_uri=redirect_uri,
                    code_verifier=code_verifier,
                    timeout=self.config.timeout_seconds,
                ),
                "authorization code",
            )

    def start_device_authorization(self) -> DeviceAuthorization:
        cfg = self.config
        if not cfg.device_url:
            raise OAuth2RefusedError("no device authorization endpoint: set EMAIL_OAUTH2_DEVICE_URL")
        data = {"client_id": cfg.client_id, "scope": " ".join(cfg.scopes)}
        if cfg.client_secret:
            data["client_secret"] = cfg.client_secret
        try:
            response = requests.post(cfg.device_url, data=data, timeout=cfg.timeout_seconds)
            body: Any = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise OAuth2UnavailableError(f"device authorization request failed: {_describe(exc)}") from None
        if not isinstance(body, dict) or "error" in body or response.status_code >= 400:
            error = body.get("error", "") if isinstance(body, dict) else ""
            description = body.get("error_description", "") if isinstance(body, dict) else ""
            raise OAuth2RefusedError(
                f"device authorization refused (HTTP {response.status_code}): {error} {description}".strip()
            )
        try:
            return DeviceAuthorization(
                device_code=str(body["device_code"]),
                user_code=str(body["user_code"]),
                # Google names it verification_url.
                verification_uri=str(body.get("verification_uri") or body["verification_url"]),
                expires_in=int(body.get("expires_in", 900)),
                interval=int(body.get("interval", 5)),
                message=body.get("message"),
            )
        except (KeyError, TypeError, ValueError):
            raise OAuth2UnavailableError("device authorization answer lacks a field of RFC 8628") from None

    def poll_device(self, device_code: str) -> TokenResponse:
        """One device access token request; raises ``DevicePending`` while the person has not
        answered yet."""
        with self._session() as session:
            try:
                return self._call(
                    lambda: session.fetch_token(
                        self.config.token_url,
                        grant_type=DEVICE_CODE_GRANT,
                        device_code=device_code,
                        client_id=self.config.client_id,
                        timeout=self.config.timeout_seconds,
                    ),
                    "device code",
                )
            except _PendingAnswer as pending:
                raise DevicePending(slow_down=pending.slow_down) from None

    def _call(self, request: Any, grant: str) -> TokenResponse:
        try:
            token = request()
        except OAuthError as exc:
            error = str(getattr(exc, "error", "") or "oauth_error")
            if error in ("authorization_pending", "slow_down") and grant == "device code":
                raise _PendingAnswer(error == "slow_down") from None
            what = f"{error}: {exc.description}" if getattr(exc, "description", None) else error
            if error in _TRANSIENT_ERRORS:
                raise OAuth2UnavailableError(f"token endpoint busy ({grant} grant): {what}") from None
            raise OAuth2RefusedError(
                f"token endpoint refused the {grant} grant: {what}{_fix(error, self.config)}"
            ) from None
        except (requests.RequestException, ValueError) as exc:
            raise OAuth2UnavailableError(
                f"token endpoint unavailable ({grant} grant): {_describe(exc)}"
            ) from None
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise OAuth2UnavailableError(f"token endpoint answered the {grant} grant without an access token")
        refresh = token.get("refresh_token")
        try:
            expires_in = int(token.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (TypeError, ValueError):
            expires_in = DEFAULT_EXPIRES_IN
        return TokenResponse(
            access_token=access,
            expires_in=max(1, expires_in),
            refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        )


class _PendingAnswer(Exception):
    def __init__(self, slow_down: bool) -> None:
        super().__init__()
        self.slow_down = slow_down


def _fix(error: str, config: OAuth2Config) -> str:
    if error == "invalid_grant" and config.flow is OAuth2Flow.REFRESH_TOKEN:
        return f" (refresh token revoked or expired: {LOGIN_FIX})"
    if error in ("invalid_client", "unauthorized_client"):
        return " (check EMAIL_OAUTH2_CLIENT_ID / EMAIL_OAUTH2_CLIENT_SECRET and the app registration)"
    if error == "invalid_scope":
        return " (check EMAIL_OAUTH2_SCOPES and the API permissions of the app registration)"
    return ""


def _describe(exc: Exception) -> str:
    """The kind of failure and its status, never the request (whose body holds the secrets)."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect"
    return type(exc).__name__
