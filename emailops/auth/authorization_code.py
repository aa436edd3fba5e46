"""The authorization-code grant with PKCE (RFC 6749 4.1, RFC 7636 S256): a person signs in to the
account's provider in a browser and the new grant replaces the stored one (the console's Reconnect;
``auth login`` stores a device-code grant the same way, ``TokenSource.store_login``).

``start`` gives the address to send the browser to and what the callback must match; the caller
keeps that (never the browser, but ``state``) and hands it to ``finish`` with the code.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from emailops.auth.token_source import TokenSource


@dataclass(frozen=True)
class PendingAuthorization:
    account: str  # the account's name
    state: str
    code_verifier: str = field(repr=False)
    redirect_uri: str


def start(source: TokenSource, account: str, redirect_uri: str) -> tuple[str, PendingAuthorization]:
    """The authorization request's address and what its callback must match.
    ``OAuth2RefusedError`` when the account has no authorization endpoint."""
    pending = PendingAuthorization(
        account=account,
        state=secrets.token_urlsafe(32),
        code_verifier=secrets.token_urlsafe(48),
        redirect_uri=redirect_uri,
    )
    url = source.endpoint.authorization_url(redirect_uri, pending.state, pending.code_verifier)
    return url, pending


def finish(source: TokenSource, pending: PendingAuthorization, code: str) -> None:
    """Exchange ``code`` (with the verifier) and store the grant, encrypted, in place of the old one;
    the account is no longer refused (``account_state`` NEW_GRANT). The caller checked ``state``.
    ``OAuth2RefusedError``/``OAuth2UnavailableError`` with the server's answer otherwise."""
    response = source.endpoint.authorization_code(code, pending.redirect_uri, pending.code_verifier)
    source.store_login(response)
