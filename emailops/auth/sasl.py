"""SASL initial responses for OAuth2 bearer tokens: XOAUTH2 (Google's and Microsoft's) and
OAUTHBEARER (RFC 7628). Both carry the access token in clear inside a base64 string, so each
built string is a secret like the token (see ``TokenSource.on_secret``).

The strings are byte-for-byte those of imapclient's ``oauth2_login``/``oauthbearer_login``, so
masking the ones built here also masks what imapclient sends.
"""

from __future__ import annotations

from collections.abc import Iterable

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
