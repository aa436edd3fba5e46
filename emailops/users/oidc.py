"""Single sign-on with an OpenID Connect provider: the authorization-code flow with PKCE.

``OidcClient`` reads the provider's ``.well-known/openid-configuration`` (its ``issuer`` must be
the one configured), builds the authorization request (``state``, ``nonce``, PKCE S256 challenge)
and, at the callback, exchanges the code and verifies the id_token: its signature against the
provider's JWKS (RS256/ES256/PS256 only, never ``none`` or a shared secret), ``iss``, ``aud``
(and ``azp`` when several audiences), ``exp``, ``iat`` and ``nonce``. Any failure raises
``OidcError`` with a message safe to show and to audit (no code, token or secret in it). The
role comes from the groups in one claim, mapped by ``role_for_groups``: the highest role wins.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from authlib.integrations.requests_client import OAuth2Session, OAuthError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from emailops.users.permissions import Role

# Asymmetric algorithms only: an HMAC id_token would be signed with the client secret.
ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384")
HTTP_TIMEOUT_SECONDS = 10.0
# Clock skew allowed between the provider and us when checking exp and iat.
LEEWAY_SECONDS = 60
_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class OidcError(Exception):
    """A sign-in that cannot succeed; the message says why (no secret in it)."""


class RoleMapError(ValueError):
    """A group-to-role mapping that cannot be read."""


def parse_role_map(text: str) -> dict[str, Role]:
    """``"admins=admin,support=operator"`` as {group: role}; a group named twice is an error."""
    mapping: dict[str, Role] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        group, sep, role = (piece.strip() for piece in item.partition("="))
        if not sep or not group or not role:
            raise RoleMapError(f"{item!r} is not group=role")
        try:
            mapping_role = Role(role)
        except ValueError:
            raise RoleMapError(f"{role!r} is not a role: {', '.join(r.value for r in Role)}") from None
        if group in mapping:
            raise RoleMapError(f"group {group!r} is mapped twice")
        mapping[group] = mapping_role
    return mapping


def role_for_groups(groups: object, role_map: Mapping[str, Role]) -> Role | None:
    """The highest role any of ``groups`` (a claim: a list of names, or one name) maps to."""
    names = [groups] if isinstance(groups, str) else groups if isinstance(groups, list) else []
    roles = [role_map[name] for name in names if isinstance(name, str) and name in role_map]
    return max(roles, key=_RANK.__getitem__) if roles else None


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    client_id: str
    client_secret: str | None = field(repr=False)
    roles_claim: str
    # (group, role) pairs: a tuple, so that a config is hashable (one client per config).
    role_map: tuple[tuple[str, Role], ...]

    def role_for(self, groups: object) -> Role | None:
        return role_for_groups(groups, dict(self.role_map))


@dataclass(frozen=True)
class PendingSignIn:
    """What the callback must match: kept by the console, never shown to the browser but state."""

    state: str
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    redirect_uri: str
    started: float


@dataclass(frozen=True)
class OidcIdentity:
    """Who the verified id_token names: the user name to use and the groups claim."""

    name: str
    subject: str
    groups: object


def _get_json(url: str) -> dict[str, Any]:
    try:
        answer = requests.get(url, timeout=HTTP_TIMEOUT_SECONDS)
        answer.raise_for_status()
        value = answer.json()
    except (requests.RequestException, ValueError) as exc:
        raise OidcError(f"the identity provider did not answer at {url}: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise OidcError(f"the identity provider's {url} is not a JSON object")
    return value


class OidcClient:
    def __init__(self, config: OidcConfig) -> None:
        self.config = config
        self._metadata: dict[str, Any] | None = None

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document, read once (a failed read is tried again next time)."""
        if self._metadata is None:
            found = _get_json(self.config.issuer + "/.well-known/openid-configuration")
            if found.get("issuer") != self.config.issuer:
                raise OidcError(f"the provider's discovery names issuer {found.get('issuer')!r}")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(found.get(key), str):
                    raise OidcError(f"the provider's discovery has no {key}")
            self._metadata = found
        return self._metadata

    def _session(self, redirect_uri: str) -> OAuth2Session:
        return OAuth2Session(
            self.config.client_id,
            self.config.client_secret,
            scope="openid profile email",
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic" if self.config.client_secret else "none",
        )

    def start(self, redirect_uri: str) -> tuple[str, PendingSignIn]:
        """The provider's address to send the browser to, and what its callback must match."""
        pending = PendingSignIn(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            code_verifier=secrets.token_urlsafe(48),
            redirect_uri=redirect_uri,
            started=time.time(),
        )
        with self._session(redirect_uri) as session:
            url, _ = session.create_authorization_url(
                self.metadata()["authorization_endpoint"],
                state=pending.state,
                nonce=pending.nonce,
                code_verifier=pending.code_verifier,
            )
        return str(url), pending

    def finish(self, pending: PendingSignIn, code: str) -> OidcIdentity:
        """Exchange ``code`` and verify the id_token it brings; the caller checked ``state``."""
        metadata = self.metadata()
        with self._session(pending.redirect_uri) as session:
            try:
                tokens = session.fetch_token(
                    metadata["token_endpoint"],
                    code=code,
                    code_verifier=pending.code_verifier,
                    timeout=HTTP_TIMEOUT_SECONDS,
                )
            except OAuthError as exc:
                raise OidcError(f"the identity provider refused the code: {exc.error}") from None
            except requests.RequestException as exc:
                raise OidcError(
                    f"the identity provider's token endpoint failed: {type(exc).__name__}"
                ) from None
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the identity provider sent no id_token")
        claims = self.verify_id_token(id_token, pending.nonce)
        name = claims.get("preferred_username") or claims.get("email") or claims.get("sub")
        if not isinstance(name, str) or not name:
            raise OidcError("the id_token names no user")
        return OidcIdentity(name=name, subject=str(claims["sub"]), groups=claims.get(self.config.roles_claim))

    def verify_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        keys = KeySet.import_key_set(_get_json(self.metadata()["jwks_uri"]))  # type: ignore[arg-type]
        try:
            token = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY_SECONDS,
                iss={"essential": True, "value": self.config.issuer},
                aud={"essential": True, "value": self.config.client_id},
                sub={"essential": True},
                exp={"essential": True},
                iat={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except (JoseError, ValueError) as exc:
            raise OidcError(f"the id_token was refused: {type(exc).__name__}: {exc}") from None
        claims = dict(token.claims)
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.config.client_id:
            raise OidcError("the id_token was refused: it was issued to another party (azp)")
        return claims
