"""Structured header values: addresses (From, To, Cc), Message-IDs and dates.

Inputs are bounded before any parsing (``email.utils`` is pure Python), and values returned are
single-line.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime, timedelta, timezone

from emailops.mime.charsets import ENCODED_WORD_RE, decode_encoded_words
from emailops.mime.header_block import MAX_HEADER_VALUE_BYTES
from emailops.mime.headers import header_text, single_line
from emailops.mime.model import Address

MAX_ADDRESS_HEADER_CHARS = 16 * 1024
MAX_ADDRESSES = 1000
MAX_MESSAGE_IDS = 256


def parse_addresses(raw: bytes, problems: list[str]) -> tuple[Address, ...]:
    """Addresses of a To/From/Cc-style header value; display names decoded from RFC 2047.

    Encoded words are masked before the address syntax is parsed, so that an encoded ``@``, ``,``
    or ``:`` (``=?utf-8?q?boss@evil?= <a@b>``) can never produce an address of its own.
    ``email.utils.getaddresses`` is pure Python and has had pathological cases on crafted input, so
    its input is bounded to ``MAX_ADDRESS_HEADER_CHARS``.
    """
    text = header_text(raw, problems)
    if len(text) > MAX_ADDRESS_HEADER_CHARS:
        problems.append("addresses-truncated")
        text = text[:MAX_ADDRESS_HEADER_CHARS]
    words: list[str] = []
    if "=?" in text:
        text, words = _mask_encoded_words(text)
    pairs = _simple_addresses(text)
    if pairs is None:
        try:
            pairs = email.utils.getaddresses([text])
        except Exception:
            problems.append("addresses-unparsable")
            return ()
    addresses: list[Address] = []
    for name, addr in pairs[:MAX_ADDRESSES]:
        if not addr and not name:
            continue
        if words:
            name = decode_encoded_words(_unmask(name, words), problems)
            addr = _unmask(addr, words)
        addresses.append(Address(single_line(name, 512), single_line(addr, 512).replace(" ", "")))
    return tuple(addresses)


_MASK = "qqewqq"  # an atom to stand for an encoded word: letters, then its index, then "x"
_MASK_RE = re.compile(_MASK + r"(\d{1,6})x")


def _mask_encoded_words(text: str) -> tuple[str, list[str]]:
    words: list[str] = []
    if _MASK in text:  # keep the mask unambiguous: text that already holds it is left unmasked
        return text, words

    def replace(match: re.Match[str]) -> str:
        words.append(match.group(0))
        return f"{_MASK}{len(words) - 1}x"

    return ENCODED_WORD_RE.sub(replace, text), words


def _unmask(text: str, words: list[str]) -> str:
    if _MASK not in text:
        return text
    return _MASK_RE.sub(
        lambda match: words[int(match.group(1))] if int(match.group(1)) < len(words) else "", text
    )


# The forms nearly all mail uses: "a@b", "Name <a@b>", "\"Name\" <a@b>", comma-separated. Anything
# else (comments, groups, quoted commas, route addresses, escapes) goes to email.utils.getaddresses.
_SIMPLE_ADDRESS_RE = re.compile(
    r'\s*(?:"([^"\\]*)"|([^<>"(),;:@\\]*?))\s*<([^<>"(),;:@\s\\]+@[^<>"(),;:@\s\\]+)>\s*'
    r'|\s*([^<>"(),;:@\s\\]+@[^<>"(),;:@\s\\]+)\s*'
)


def _simple_addresses(text: str) -> list[tuple[str, str]] | None:
    if "(" in text or "\\" in text or ":" in text:
        return None
    chunks = [text] if "," not in text else text.split(",") if '"' not in text else None
    if chunks is None:
        return None
    pairs: list[tuple[str, str]] = []
    for chunk in chunks:
        match = _SIMPLE_ADDRESS_RE.fullmatch(chunk)
        if match is None:
            if chunk.strip():
                return None
            continue
        quoted, plain, bracketed, bare = match.groups()
        if bare is not None:
            pairs.append(("", bare))
        else:
            pairs.append((quoted if quoted is not None else " ".join(plain.split()), bracketed))
    return pairs


_MESSAGE_ID_RE = re.compile(r"<([^<>\s]{1,998})>")


def parse_message_ids(raw: bytes, problems: list[str], limit: int = MAX_MESSAGE_IDS) -> tuple[str, ...]:
    """All ``<...>`` tokens of a Message-ID/In-Reply-To/References value, normalised to ``<id>``.

    A value with no angle brackets (seen in real mail) is taken as one bare id: its first word.
    """
    text = single_line(header_text(raw, problems), MAX_HEADER_VALUE_BYTES)
    ids = [f"<{found}>" for found in _MESSAGE_ID_RE.findall(text)]
    if not ids:
        bare = text.strip().strip("<>").split(" ", 1)[0] if text.strip() else ""
        if bare and "<" not in bare and ">" not in bare and len(bare) <= 998:
            ids = [f"<{bare}>"]
    return tuple(ids[:limit])


_MAX_UTC_OFFSET = 24 * 3600 - 1


def parse_date(raw: bytes, problems: list[str]) -> datetime | None:
    """An aware datetime (UTC when the header has no usable zone), or ``None`` if unparsable."""
    text = single_line(header_text(raw, problems), 256)
    if not text:
        return None
    try:
        parsed = email.utils.parsedate_tz(text)
    except Exception:
        parsed = None
    if parsed is None:
        problems.append("date-invalid")
        return None
    offset = parsed[9] or 0
    try:
        zone = timezone(timedelta(seconds=offset)) if abs(offset) <= _MAX_UTC_OFFSET and offset else UTC
        return datetime(*parsed[:6], tzinfo=zone)
    except (ValueError, OverflowError):
        problems.append("date-invalid")
        return None
