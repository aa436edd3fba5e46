"""SASL initial responses for OAuth2 bearer tokens: XOAUTH2 (Google's and Microsoft's) and
OAUTHBEARER (RFC 7628). Both carry the access token in clear inside a base64 string, so each
built string is a secret like the token (see ``TokenSource.on_secret``).

The strings are byte-for-byte those of imapclient's ``oauth2_login``/``oauthbearer_login``, so
masking the ones built here also masks what imapclient sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

XOAUTH2 = "XOAUTH2"
OAUTHBEARER = "OAUTHBEARER"


def xoauth2(user: str, token: str) -> str:
    return f"user={user}\1auth=Bearer {token}\1\1"


def oauthbearer(user: str, token: str) -> str:
    # RFC 5801 gs2-header: "=" and "," in the authzid are escaped.
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={authzid},\1auth=Bearer {token}\1\1"


def sasl_strings(user: str, token: str) -> tuple[str, ...]:
    """Every SASL string that carries ``token`` for ``user`` (to be masked in logs)."""
    return (xoauth2(user, token), oauthbearer(user, token))


class NoOAuth2Mechanism(Exception):
    """The server lists its SASL mechanisms, and neither OAuth2 one is among them."""


def choose_mechanism(offered: Iterable[str]) -> str:
    """OAUTHBEARER (the standard) when the server offers it, otherwise XOAUTH2 (what Microsoft
    365 offers; also tried when the server lists no mechanism at all). Raises
    ``NoOAuth2Mechanism`` when the server lists mechanisms but no OAuth2 one."""
    names = {name.upper() for name in offered}
    if OAUTHBEARER in names:
        return OAUTHBEARER
    if XOAUTH2 in names or not names:
        return XOAUTH2
    raise NoOAuth2Mechanism(
        f"the server offers no OAuth2 sign-in (AUTH {' '.join(sorted(names))}): check the host "
        "(EMAIL_IMAP_HOST / EMAIL_SMTP_HOST) and that OAuth2 is enabled for the account"
    )


class TokenRefused(Exception):
    """Raised by a protocol's sign-in step: the server refused the access token. ``detail`` is what
    it said, ``code`` its reply code where the protocol has one (SMTP)."""

    def __init__(self, detail: str, code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


class TokenRefusedAgain(Exception):
    """The server refused the access token, and then also the one the token source gave for that
    refusal. ``second`` is the second refusal; None when the source had nothing newer to give (the
    refused token had just been issued): the app's permissions, not the token, are at fault."""

    def __init__(self, second: TokenRefused | None) -> None:
        super().__init__(second.detail if second else "the freshly issued access token was refused")
        self.second = second


def sign_in_with_one_refresh(
    access_token: Callable[[str | None], str], sign_in: Callable[[str], None]
) -> None:
    """Sign in with the current access token; when ``sign_in`` raises ``TokenRefused``, once more
    with the token ``access_token(rejected=that token)`` gives (a server may revoke a token before
    it expires). Never more than once: a second refusal is ``TokenRefusedAgain``, which the caller
    reports as what the operator must fix, so that a refused app does not storm the token endpoint."""
    token = access_token(None)
    try:
        sign_in(token)
        return
    except TokenRefused:
        pass
    renewed = access_token(token)
    if renewed == token:
        raise TokenRefusedAgain(None)
    try:
        sign_in(renewed)
    except TokenRefused as second:
        raise TokenRefusedAgain(second) from None
