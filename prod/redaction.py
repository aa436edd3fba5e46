"""Masking of secrets in log lines and error reports.

Two layers, because neither is enough alone:
- known values: the password (and anything else registered at start-up) is masked in every form a
  library may print it: raw, ``repr`` of str or bytes, JSON-escaped, URL-quoted, IMAP-quoted, and
  base64 (alone, as SMTP ``AUTH LOGIN`` sends it, or inside a SASL PLAIN ``\\0user\\0password``);
  secrets that change (OAuth2 tokens) are held per source, only while they can still appear;
- patterns: IMAP ``LOGIN`` arguments, ``AUTHENTICATE``/``AUTH`` initial responses, ``Authorization``
  headers, passwords in URLs and ``password=...`` pairs, whatever the value.

Pure standard library: the healthcheck imports it and must stay light.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

MASK = "**********"

# Values shorter than this are not masked by value (masking "a" would shred every line); the
# patterns still apply to them.
_MIN_SECRET_LENGTH = 4

# How long a replaced secret stays masked: longer than an access token is used after its
# successor arrives (it is refreshed 5 minutes before it expires), a sign-in under way with it, or
# an error that carries it and is logged after its retries.
REPLACED_SECRET_GRACE_SECONDS = 15 * 60

_QUOTED_OR_ATOM = r'(?:"(?:[^"\\]|\\.)*"|\{\d+\+?\}|[^\s\'"\\]+)'
_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # IMAP: `a001 LOGIN user password` (imapclient masks this itself; imaplib and others may not).
    (re.compile(rf"\bLOGIN\s+{_QUOTED_OR_ATOM}\s+{_QUOTED_OR_ATOM}"), f"LOGIN {MASK}"),
    # IMAP AUTHENTICATE / SMTP AUTH with an initial response: `AUTH PLAIN <base64>`.
    (
        re.compile(r"(?i)\b(AUTH(?:ENTICATE)?\s+[A-Z0-9_-]+)\s+(?!\*{10})[^\s'\"\\]+"),
        rf"\1 {MASK}",
    ),
    # HTTP: `Authorization: Basic xxx`, `Proxy-Authorization: Bearer xxx`, `authorization=xxx`.
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
            r"(?:(basic|bearer|digest|token|negotiate)\s+)?[^\s\"',;]+"
        ),
        lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{MASK}",
    ),
    # URLs: scheme://user:password@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s/]+(@)"), rf"\1{MASK}\2"),
    # key=value and "key": "value" pairs whose key says secret.
    (
        re.compile(
            r"(?i)\b((?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)"
            r"[\"']?\s*[:=]\s*[\"']?)(?!\*{10})[^\s\"',;&]+"
        ),
        rf"\1{MASK}",
    ),
)

_SENSITIVE_KEY = re.compile(
    r"(?i)(password|passwd|pwd|secret|token|api[_-]?key|authorization|cookie|credential|dsn)"
)


def secret_variants(value: str, *, username: str | None = None) -> set[str]:
    """Every spelling of ``value`` a library or renderer may produce."""
    raw = value.encode("utf-8")
    variants = {
        value,
        repr(value)[1:-1],
        repr(raw)[2:-1],
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        quote_plus(value),
        value.replace("\\", "\\\\").replace('"', '\\"'),
        base64.b64encode(raw).decode("ascii"),
        # base64 without padding, as some clients send it
        base64.b64encode(raw).decode("ascii").rstrip("="),
    }
    if username:
        sasl_plain = b"\0" + username.encode("utf-8") + b"\0" + raw
        variants.add(base64.b64encode(sasl_plain).decode("ascii"))
        sasl_plain_authzid = username.encode("utf-8") + sasl_plain
        variants.add(base64.b64encode(sasl_plain_authzid).decode("ascii"))
    # Second-level escaping: a JSON line that quotes a repr, an exception text inside JSON, ...
    for variant in list(variants):
        variants.add(json.dumps(variant)[1:-1])
        variants.add(repr(variant)[1:-1])
    return {v for v in variants if len(v) >= _MIN_SECRET_LENGTH}


@dataclass(frozen=True)
class _SourceSecrets:
    """What one source of changing secrets holds: its current spellings, and those of the values
    they replaced, masked until ``replaced_until`` (``time.monotonic``)."""

    current: frozenset[str]
    replaced: frozenset[str]
    replaced_until: float


class Redactor:
    """Masks registered secret values and secret-shaped patterns in strings and nested data.

    Its size depends on the number of secrets and sources, never on how often a source changes:
    ``register`` is for the fixed secrets of the settings, ``replace_secrets`` for those that change.
    """

    def __init__(
        self,
        *,
        grace_seconds: float = REPLACED_SECRET_GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._grace_seconds = grace_seconds
        self._clock = clock
        self._permanent: frozenset[str] = frozenset()
        self._sources: dict[str, _SourceSecrets] = {}
        # When the first replaced secret stops being masked (its source's ``replaced_until``).
        self._next_expiry = math.inf
        self._values: tuple[str, ...] = ()

    def register(self, secret: str, *, username: str | None = None) -> None:
        """Mask ``secret`` (in all its spellings) from now on, in this process."""
        if not secret:
            return
        with self._lock:
            self._permanent |= secret_variants(secret, username=username)
            self._rebuild()

    def replace_secrets(self, source: str, secrets: Iterable[str]) -> None:
        """``secrets`` are what ``source`` (one account's access token, say) holds now: masked
        from now on. What it held before stays masked for the grace window, as it may still be in
        flight; anything older is dropped, being held by nothing in this process any more."""
        current = frozenset().union(*(secret_variants(secret) for secret in secrets if secret))
        with self._lock:
            now = self._clock()
            before = self._sources.get(source)
            if before is not None and before.current == current:
                return
            self._sources[source] = _SourceSecrets(
                current=current,
                replaced=before.current if before is not None else frozenset(),
                replaced_until=now + self._grace_seconds,
            )
            self._rebuild()

    @property
    def size(self) -> int:
        """How many spellings are masked by value."""
        return len(self._values)

    def _drop_expired(self) -> None:
        with self._lock:
            now = self._clock()
            for source, held in list(self._sources.items()):
                if held.replaced and held.replaced_until <= now:
                    self._sources[source] = _SourceSecrets(held.current, frozenset(), math.inf)
            self._rebuild()

    def _rebuild(self) -> None:
        """``_values`` from the permanent secrets and what the sources hold (under ``_lock``)."""
        known = self._permanent.union(*(held.current | held.replaced for held in self._sources.values()))
        # Longest first, so that a variant containing another is masked whole.
        self._values = tuple(sorted(known, key=len, reverse=True))
        self._next_expiry = min(
            (held.replaced_until for held in self._sources.values() if held.replaced),
            default=math.inf,
        )

    def register_url_password(self, url: str) -> None:
        """Mask the password of ``url`` as written there (percent-encoded) and decoded, as the
        driver sends it and its errors may print it."""
        written = urlsplit(url).password
        if written:
            self.register(written)
            self.register(unquote(written))

    def clear(self) -> None:
        with self._lock:
            self._permanent = frozenset()
            self._sources.clear()
            self._rebuild()

    def redact_known_values(self, text: str) -> str:
        """Mask registered values only: safe on already-rendered JSON (patterns could span fields)."""
        if self._clock() >= self._next_expiry:
            self._drop_expired()
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def redact_text(self, text: str) -> str:
        text = self.redact_known_values(text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def redact(self, data: Any) -> Any:
        """A copy of ``data`` (str, bytes, dict, list, tuple, other) with secrets masked.

        Values under a key that names a secret (``password``, ``authorization``, ``token``...) are
        masked whole.
        """
        if isinstance(data, str):
            return self.redact_text(data)
        if isinstance(data, bytes | bytearray):
            return self.redact_text(bytes(data).decode("utf-8", "replace"))
        if isinstance(data, dict):
            return self.redact_dict(data)
        if isinstance(data, list):
            return [self.redact(item) for item in data]
        if isinstance(data, tuple):
            return tuple(self.redact(item) for item in data)
        return data

    def redact_dict(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``redact`` of a mapping (an event, a record), typed as what it returns."""
        return {
            key: (MASK if _is_sensitive_key(key, value) else self.redact(value))
            for key, value in data.items()
        }


def _is_sensitive_key(key: object, value: object) -> bool:
    return isinstance(key, str) and bool(_SENSITIVE_KEY.search(key)) and isinstance(value, str | bytes)


# One per process: logging, Sentry and the healthcheck all mask with the same known values.
REDACTOR = Redactor()
