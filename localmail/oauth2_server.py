"""A throwaway OAuth2 authorization server on loopback, for tests and the demo of OAuth2 sign-in.

It plays Microsoft's or Google's part: a token endpoint (refresh_token grant with refresh-token
rotation, client_credentials, the device_code grant of RFC 8628, and the authorization_code grant
with PKCE of RFC 7636, S256 only), a device authorization endpoint with a way for the test to
approve a code as the person would, an authorization endpoint (``/authorize``: a page where the
person, in a real browser, names the mailbox and allows the client), and an introspection
endpoint (RFC 7662) that LocalDovecot's ``passdb { driver = oauth2 }`` and the SMTP relay ask
whether an access token is valid. It counts the requests it answers, per endpoint and grant, so
that tests can prove that a refresh was made exactly once, or that a revoked token does not
cause a storm.

Tokens are random strings with recognisable prefixes (``eo-at-``, ``eo-rt-``), so that a test
can look for them in any output.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from localmail.dovecot import LOOPBACK

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ACCESS_PREFIX = "eo-at-"
REFRESH_PREFIX = "eo-rt-"


@dataclass
class _Access:
    username: str
    client_id: str
    expires_at: float


@dataclass
class _Device:
    client_id: str
    user_code: str
    expires_at: float
    username: str | None = None
    denied: bool = False
    used: bool = False


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    code_challenge: str
    username: str
    expires_at: float
    used: bool = False


class TokenError(Exception):
    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


class LocalOAuth2Server:
    """``clients`` maps client ids to their secret (None: a public client). ``app_users`` maps a
    client id to the mailbox its client_credentials tokens may open (app-only access).
    ``access_token_seconds`` is the lifetime of access tokens; ``rotate_refresh_tokens`` issues a
    new refresh token at each refresh and refuses the old one from then on (Microsoft's way)."""

    def __init__(
        self,
        clients: dict[str, str | None],
        *,
        app_users: dict[str, str] | None = None,
        access_token_seconds: int = 3600,
        rotate_refresh_tokens: bool = True,
        device_interval: int = 1,
    ) -> None:
        self.clients = dict(clients)
        self.app_users = dict(app_users or {})
        self.access_token_seconds = access_token_seconds
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.device_interval = device_interval
        # Seconds each token request takes (widens the window in which workers could race).
        self.token_delay_seconds = 0.0
        # When set, token requests are answered with this HTTP status and no JSON (an outage).
        self.outage_status: int | None = None
        self._lock = threading.Condition()
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, tuple[str, str]] = {}  # token -> (username, client_id)
        self._devices: dict[str, _Device] = {}  # device_code -> state
        self._codes: dict[str, _Code] = {}  # authorization code -> what its exchange must match
        self.requests: Counter[str] = Counter()
        # Every token ever issued, for tests that look for them in output.
        self.issued: list[str] = []
        self.host = LOOPBACK
        self._server = ThreadingHTTPServer((self.host, 0), _handler(self))
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def device_url(self) -> str:
        return f"{self.base_url}/devicecode"

    @property
    def authorize_url(self) -> str:
        return f"{self.base_url}/authorize"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="oauth2-server", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalOAuth2Server:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- test controls

    def issue_refresh_token(self, username: str, client_id: str) -> str:
        """A refresh token as if ``username`` had signed in to ``client_id`` elsewhere."""
        token = REFRESH_PREFIX + secrets.token_hex(16)
        with self._lock:
            self._refresh[token] = (username, client_id)
            self.issued.append(token)
        return token

    def issue_access_token(self, username: str, client_id: str, seconds: int | None = None) -> str:
        token = ACCESS_PREFIX + secrets.token_hex(16)
        lifetime = self.access_token_seconds if seconds is None else seconds
        with self._lock:
            self._access[token] = _Access(username, client_id, time.time() + lifetime)
            self.issued.append(token)
        return token

    def approve(self, user_code: str, username: str) -> None:
        """The person signs in and accepts the code shown by ``emailops auth login``."""
        with self._lock:
            device = next(d for d in self._devices.values() if d.user_code == user_code)
            device.username = username
            self._lock.notify_all()

    def deny(self, user_code: str) -> None:
        with self._lock:
            next(d for d in self._devices.values() if d.user_code == user_code).denied = True

    def revoke_refresh_tokens(self, client_id: str | None = None) -> None:
        """Revoke every refresh token, or those of ``client_id`` only (its grant withdrawn)."""
        with self._lock:
            for token, (_username, owner) in list(self._refresh.items()):
                if client_id is None or owner == client_id:
                    del self._refresh[token]

    def revoke_access_tokens(self) -> None:
        with self._lock:
            self._access.clear()

    def refresh_token_valid(self, token: str) -> bool:
        with self._lock:
            return token in self._refresh

    def count(self, key: str) -> int:
        """Requests answered so far: ``token``, ``token:<grant_type>``, ``devicecode``, ``introspect``;
        ``token:<grant_type>:<client_id>``: those of a known client with its secret."""
        with self._lock:
            return self.requests[key]

    def introspect(self, token: str) -> dict[str, Any]:
        with self._lock:
            access = self._access.get(token)
            if access is None or access.expires_at <= time.time():
                return {"active": False}
            return {
                "active": True,
                "username": access.username,
                "client_id": access.client_id,
                "exp": int(access.expires_at),
                "token_type": "Bearer",
            }

    # ----------------------------------------------------------------------------- endpoints

    def _count(self, key: str) -> None:
        with self._lock:
            self.requests[key] += 1
            self._lock.notify_all()

    def _client(self, form: dict[str, str], authorization: str | None) -> str:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            decoded = base64.b64decode(authorization[6:]).decode()
            client_id, _, secret = (unquote(part) for part in decoded.partition(":"))
        if client_id not in self.clients:
            raise TokenError("invalid_client", "unknown client", 401)
        expected = self.clients[client_id]
        if expected is not None and secret != expected:
            raise TokenError("invalid_client", "wrong client secret", 401)
        return client_id

    def token(self, form: dict[str, str], authorization: str | None) -> dict[str, Any]:
        grant = form.get("grant_type", "")
        self._count("token")
        self._count(f"token:{grant}")
        if self.token_delay_seconds:
            time.sleep(self.token_delay_seconds)
        if self.outage_status is not None:
            raise TokenError("", "", self.outage_status)
        client_id = self._client(form, authorization)
        self._count(f"token:{grant}:{client_id}")
        if grant == "refresh_token":
            return self._refresh_grant(form.get("refresh_token", ""), client_id)
        if grant == "client_credentials":
            username = self.app_users.get(client_id)
            if username is None:
                raise TokenError("unauthorized_client", "no app-only access for this client")
            return self._tokens(username, client_id, refresh=False)
        if grant == DEVICE_CODE_GRANT:
            return self._device_grant(form.get("device_code", ""), client_id)
        if grant == "authorization_code":
            return self._code_grant(form, client_id)
        raise TokenError("unsupported_grant_type")

    def _code_grant(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        verifier = form.get("code_verifier", "")
        with self._lock:
            found = self._codes.get(form.get("code", ""))
            if found is None or found.used or found.client_id != client_id or found.expires_at < time.time():
                raise TokenError("invalid_grant", "unknown, used or expired authorization code")
            found.used = True  # at most once, even when the checks below fail
            if form.get("redirect_uri") != found.redirect_uri:
                raise TokenError("invalid_grant", "redirect_uri differs from the authorization request's")
            if not verifier or s256(verifier) != found.code_challenge:
                raise TokenError("invalid_grant", "PKCE: the code_verifier does not match the code_challenge")
            username = found.username
        return self._tokens(username, client_id, refresh=True)

    def authorization_request(self, query: dict[str, str]) -> str:
        """The sign-in page of a valid authorization request; ``TokenError`` otherwise."""
        self._count("authorize")
        self._check_authorization_request(query)
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(key)}" value="{html.escape(value)}">'
            for key, value in query.items()
        )
        client = html.escape(query["client_id"])
        return (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Sign in</title></head><body>"
            f"<h1>Sign in to allow {client}</h1><form method='post' action='/authorize'>{hidden}"
            "<label for='username'>Mailbox</label> <input id='username' name='username' required>"
            "<button type='submit'>Allow</button></form></body></html>"
        )

    def _check_authorization_request(self, query: dict[str, str]) -> None:
        if query.get("client_id") not in self.clients:
            raise TokenError("invalid_client", "unknown client")
        if query.get("response_type") != "code":
            raise TokenError("unsupported_response_type")
        redirect = urlsplit(query.get("redirect_uri", ""))
        if redirect.scheme not in ("http", "https") or not redirect.netloc:
            raise TokenError("invalid_request", "redirect_uri must be an absolute address")
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            raise TokenError("invalid_request", "PKCE with code_challenge_method=S256 is required")

    def authorize(self, form: dict[str, str]) -> str:
        """The person allowed the request as ``username``: the redirect back with a code."""
        self._check_authorization_request(form)
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _Code(
                client_id=form["client_id"],
                redirect_uri=form["redirect_uri"],
                code_challenge=form["code_challenge"],
                username=form.get("username", "").strip(),
                expires_at=time.time() + 60,
            )
        back = {"code": code} | ({"state": form["state"]} if "state" in form else {})
        separator = "&" if "?" in form["redirect_uri"] else "?"
        return form["redirect_uri"] + separator + urlencode(back)

    def _refresh_grant(self, refresh_token: str, client_id: str) -> dict[str, Any]:
        with self._lock:
            owner = self._refresh.get(refresh_token)
            if owner is None or owner[1] != client_id:
                raise TokenError("invalid_grant", "AADSTS70000: the refresh token was revoked or expired")
            if self.rotate_refresh_tokens:
                del self._refresh[refresh_token]
        answer = self._tokens(owner[0], client_id, refresh=self.rotate_refresh_tokens)
        return answer

    def _device_grant(self, device_code: str, client_id: str) -> dict[str, Any]:
        with self._lock:
            device = self._devices.get(device_code)
            if device is None or device.client_id != client_id or device.used:
                raise TokenError("invalid_grant", "unknown device code")
            if device.expires_at < time.time():
                raise TokenError("expired_token")
            if device.denied:
                raise TokenError("access_denied", "the user declined")
            if device.username is None:
                raise TokenError("authorization_pending")
            device.used = True
            username = device.username
        return self._tokens(username, client_id, refresh=True)

    def _tokens(self, username: str, client_id: str, *, refresh: bool) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": self.issue_access_token(username, client_id),
            "expires_in": self.access_token_seconds,
        }
        if refresh:
            answer["refresh_token"] = self.issue_refresh_token(username, client_id)
        return answer

    def device_authorization(self, form: dict[str, str], authorization: str | None) -> dict[str, Any]:
        self._count("devicecode")
        client_id = self._client(form, authorization)
        device_code = secrets.token_hex(16)
        user_code = f"{secrets.randbelow(10**4):04d}-{secrets.randbelow(10**4):04d}"
        with self._lock:
            self._devices[device_code] = _Device(client_id, user_code, time.time() + 300)
            self._lock.notify_all()
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{self.base_url}/device",
            "expires_in": 300,
            "interval": self.device_interval,
        }


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of ``verifier`` (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _handler(server: LocalOAuth2Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read the counters, not an access log

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/authorize":
                self._answer(404, {"error": "not_found"})
                return
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            try:
                page = server.authorization_request(query)
            except TokenError as exc:
                self._text(400, f"{exc.error}: {exc.description}")
                return
            self._text(200, page, "text/html; charset=utf-8")

        def _text(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8")
            form = {key: values[0] for key, values in parse_qs(body).items()}
            authorization = self.headers.get("Authorization")
            try:
                if self.path == "/token":
                    self._answer(200, server.token(form, authorization))
                elif self.path == "/devicecode":
                    self._answer(200, server.device_authorization(form, authorization))
                elif self.path == "/authorize":
                    location = server.authorize(form)
                    self.send_response(303)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/introspect":
                    server._count("introspect")
                    self._answer(200, server.introspect(form.get("token", "")))
                else:
                    self._answer(404, {"error": "not_found"})
            except TokenError as exc:
                if not exc.error:
                    self._answer(exc.status, None)
                else:
                    self._answer(exc.status, {"error": exc.error, "error_description": exc.description})

        def _answer(self, status: int, payload: dict[str, Any] | None) -> None:
            data = json.dumps(payload).encode() if payload is not None else b"<html>unavailable</html>"
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if payload is not None else "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

    return Handler
