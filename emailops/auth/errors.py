"""OAuth2 failures, split by what fixes them: a person (refused) or time (unavailable)."""

from __future__ import annotations

LOGIN_FIX = "run `emailops auth login`"


class OAuth2Error(Exception):
    """Base class: no access token could be had. Messages never carry a token or a secret."""


class OAuth2RefusedError(OAuth2Error):
    """The authorization server refused the grant (``invalid_grant``: refresh token revoked or
    expired; ``invalid_client``: wrong client id or secret), or no sign-in is stored. Retrying
    will not help until the operator acts; the message names the fix."""


class OAuth2UnavailableError(OAuth2Error):
    """The token endpoint could not be reached or failed (network, timeout, 5xx,
    ``temporarily_unavailable``): retry later with backoff."""


class OAuth2KeyError(OAuth2RefusedError):
    """The stored tokens cannot be decrypted with the configured key (EMAIL_OAUTH2_TOKEN_KEY)."""
