"""A throwaway OpenID Connect provider on loopback, for the tests of the console's single sign-on.

It serves discovery (``/.well-known/openid-configuration``), its JWKS (an RSA key made at start),
an authorize endpoint that approves at once as ``user`` (redirecting to the client with a code)
and a token endpoint that checks the client, the redirect URI and the PKCE S256 verifier before
returning an RS256 id_token with the user's claims and the request's nonce. ``tamper`` changes
the next id_tokens the way an attacker or a misconfiguration would, so that the tests can prove
the console refuses them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import RSAKey

from localmail.dovecot import LOOPBACK

Tamper = Literal["foreign_key", "nonce", "audience", "expired", "issuer"]


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    claims: dict[str, Any]


@dataclass
class LocalOidcProvider:
    """``clients`` maps client ids to their secret (None: a public client); ``user`` holds the
    claims of whoever signs in next (``preferred_username``, ``groups``, ...)."""

    clients: dict[str, str | None]
    user: dict[str, Any] = field(default_factory=dict)
    tamper: Tamper | None = None
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1"}))
    _grants: dict[str, _Grant] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def issuer(self) -> str:
        assert self._server is not None
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> LocalOidcProvider:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def authorize(self, query: dict[str, str]) -> str:
        """The address the browser is sent back to: the client's redirect URI with a code."""
        if query.get("client_id") not in self.clients or query.get("response_type") != "code":
            raise ValueError("unknown client or response type")
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            raise ValueError("PKCE S256 is required")
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._grants[code] = _Grant(
                client_id=query["client_id"],
                redirect_uri=query["redirect_uri"],
                challenge=query["code_challenge"],
                nonce=query.get("nonce", ""),
                claims=dict(self.user),
            )
        answer = urlencode({"code": code, "state": query.get("state", "")})
        return f"{query['redirect_uri']}?{answer}"

    def token(self, form: dict[str, str], authorization: str | None) -> dict[str, Any]:
        client_id = form.get("client_id")
        secret = None
        if authorization and authorization.lower().startswith("basic "):
            client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        if client_id not in self.clients or self.clients[client_id] != secret:
            raise ValueError("invalid_client")
        with self._lock:
            grant = self._grants.pop(form.get("code", ""), None)
        if grant is None or grant.client_id != client_id or grant.redirect_uri != form.get("redirect_uri"):
            raise ValueError("invalid_grant")
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != grant.challenge:
            raise ValueError("invalid_grant")
        return {
            "access_token": secrets.token_urlsafe(24),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": self.id_token(client_id, grant),
        }

    def id_token(self, client_id: str, grant: _Grant) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": grant.claims.get("preferred_username", "someone"),
            "aud": client_id,
            "iat": now,
            "exp": now + 300,
            "nonce": grant.nonce,
            **grant.claims,
        }
        key = self.key
        if self.tamper == "foreign_key":
            key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        elif self.tamper == "nonce":
            claims["nonce"] = secrets.token_urlsafe(32)
        elif self.tamper == "audience":
            claims["aud"] = "another-client"
        elif self.tamper == "expired":
            claims["exp"] = now - 3600
        elif self.tamper == "issuer":
            claims["iss"] = "https://attacker.example"
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)


def _handler(provider: LocalOidcProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            if parts.path == "/.well-known/openid-configuration":
                self._json(200, provider.discovery())
            elif parts.path == "/jwks":
                self._json(200, provider.jwks())
            elif parts.path == "/authorize":
                try:
                    location = provider.authorize(query)
                except (ValueError, KeyError) as exc:
                    self._json(400, {"error": "invalid_request", "error_description": str(exc)})
                    return
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode()
            form = {key: values[0] for key, values in parse_qs(body).items()}
            if urlsplit(self.path).path != "/token":
                self._json(404, {"error": "not_found"})
                return
            try:
                self._json(200, provider.token(form, self.headers.get("Authorization")))
            except ValueError as exc:
                self._json(400 if str(exc) != "invalid_client" else 401, {"error": str(exc)})

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
