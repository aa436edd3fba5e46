"""Passwords (Argon2id) and API tokens (random, stored as SHA-256) of console users.

Passwords are hashed by argon2-cffi with its defaults (RFC 9106's low-memory profile: Argon2id,
64 MiB, 3 passes, 4 lanes); a stored hash made with other parameters is rehashed at the next
successful sign-in (``needs_rehash``). An API token has 256 random bits, so a fast hash suffices:
what is stored cannot be turned back into the token, and the token cannot be guessed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

HASHER = PasswordHasher()

# NIST SP 800-63B-4: at least 15 characters for a password that is the only factor.
MIN_PASSWORD_LENGTH = 15
# Bounds the work one sign-in attempt can ask for.
MAX_PASSWORD_LENGTH = 1024
# Marks a string as an EmailOps API token (for secret scanners and for the reader of a config).
TOKEN_PREFIX = "eo_"  # noqa: S105 (a marker, not a secret)


class WeakPasswordError(ValueError):
    """A password outside the length bounds."""


def check_password_length(password: str) -> None:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise WeakPasswordError(
            f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters "
            f"(this one has {len(password)})"
        )


def hash_password(password: str) -> str:
    check_password_length(password)
    return HASHER.hash(password)


def new_password() -> str:
    """A generated password: 144 random bits, 24 URL-safe characters."""
    return secrets.token_urlsafe(18)


# Checked in place of the hash of an unknown or disabled user: the hash of a random string nobody
# kept, made with HASHER's parameters (a test keeps them equal), so checking it costs what checking
# a real one does, from the first attempt on.
DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$We1rSV1ODoJQTeiuZjxtEw$amTqmLOMAVcpIwadddJ10RcR18saKuN/csvj2EsbY+c"
)


def password_matches(stored_hash: str | None, password: str) -> bool:
    """Whether ``password`` is the one ``stored_hash`` was made from. With no hash (an unknown or
    disabled user) a dummy hash is checked instead and False returned: the same time either way,
    so the answer's delay does not tell whether a user exists. An over-long password is refused
    unchecked, whoever it is for."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    if stored_hash is not None and not stored_hash.startswith("$argon2"):
        stored_hash = None  # a user without a password (single sign-on): checked like an unknown one
    try:
        HASHER.verify(stored_hash or DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return False
    return stored_hash is not None


def needs_rehash(stored_hash: str) -> bool:
    return HASHER.check_needs_rehash(stored_hash)


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What is stored of an API token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def digests_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))
