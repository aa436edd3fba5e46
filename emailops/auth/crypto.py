"""Secrets at rest (OAuth2 tokens, account passwords): encrypted with Fernet (AES-128-CBC +
HMAC-SHA256) under keys from the environment, so that a copy of the database or of a backup alone
holds no usable secret."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from emailops.auth.errors import OAuth2KeyError


def check_key(key: str) -> None:
    """Raise ``ValueError`` (without the key in the message) unless ``key`` is a Fernet key."""
    try:
        Fernet(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("not a Fernet key (32 bytes, url-safe base64: 44 characters)") from None


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


class WrongKeyError(ValueError):
    """A stored secret cannot be decrypted with the configured keys (another key encrypted it)."""


class SecretCipher:
    """Encrypts with the first key, decrypts with any (key rotation: put the new key first)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._fernet = MultiFernet([Fernet(key.encode("ascii")) for key in keys])

    def encrypt(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode("utf-8"))

    def decrypt(self, stored: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(stored)).decode("utf-8")
        except InvalidToken:
            raise WrongKeyError(
                "a stored secret cannot be decrypted with SECRETS_KEY (another key encrypted it): "
                "restore that key, or put it after the new one (NEW,OLD)"
            ) from None

    def rotate(self, stored: bytes) -> bytes:
        """``stored`` encrypted again with the first key (read with any)."""
        try:
            return self._fernet.rotate(bytes(stored))
        except InvalidToken:
            raise WrongKeyError(
                "a stored secret cannot be decrypted with any key of SECRETS_KEY: add the key that "
                "encrypted it after the new one (NEW,OLD)"
            ) from None


class TokenCipher(SecretCipher):
    """The OAuth2 tokens' cipher: a wrong key is a refused sign-in, whose fix is named."""

    def decrypt(self, stored: bytes) -> str:
        try:
            return super().decrypt(stored)
        except WrongKeyError:
            raise OAuth2KeyError(
                "the stored OAuth2 tokens cannot be decrypted with SECRETS_KEY (EMAIL_OAUTH2_TOKEN_KEY; "
                "another key encrypted them): restore that key, or run `emailops auth login` to sign in again"
            ) from None
