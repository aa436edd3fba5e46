"""Structured header values: addresses (From, To, Cc), Message-IDs and dates.

Inputs are bounded before any parsing (``email.utils`` is pure Python), and values returned are
single-line.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import NamedTuple

from emailops.mime.charsets import ENCODED_WORD_RE, decode_encoded_words
from emailops.mime.header_block import MAX_HEADER_VALUE_BYTES
from emailops.mime.headers import header_text, single_line
from emailops.mime.model import Address

MAX_ADDRESS_HEADER_CHARS = 16 * 1024
MAX_ADDRESSES = 1000
MAX_MESSAGE_IDS = 256


def parse_addresses(raw: bytes, problems: list[str]) -> tuple[Address, ...]:
    """The mailboxes of a From/To/Cc/Reply-To-style value (RFC 5322 address-list), in order.

    Every path that needs a message's addresses gets them from here (indexing, the migration that
    re-parses stored headers, the configured From). Read leniently, as real mail is written:

    - a display name is its words (atoms, quoted strings unescaped, RFC 2047 encoded words decoded)
      one space apart; comments are not part of it, but a mailbox with no display name takes its
      comments as one (``a@b (Ann)``, an old convention);
    - the members of a group (``Team: a@b, c@d;``) are listed, the group's name is dropped, and an
      empty group (``undisclosed-recipients:;``) has none; ``;`` also separates outside a group;
    - a source route (``<@relay1,@relay2:a@b>``) is dropped: the address is ``a@b``;
    - an encoded word is one token: what it encodes (``=?utf-8?q?a=2C_b@evil?=``) never separates
      or makes an address, nor does a comma, ``@`` or ``<`` written raw inside one.

    Work is linear in the value, bounded to ``MAX_ADDRESS_HEADER_CHARS`` characters; at most
    ``MAX_ADDRESSES`` addresses are returned.
    """
    text = header_text(raw, problems)
    if len(text) > MAX_ADDRESS_HEADER_CHARS:
        problems.append("addresses-truncated")
        text = text[:MAX_ADDRESS_HEADER_CHARS]
    pairs = _simple_addresses(text) if "=?" not in text or _plain_encoded_words(text) else None
    if pairs is not None:
        return tuple(
            _address(decode_encoded_words(name, problems) if "=?" in name else name, email)
            for name, email in pairs[:MAX_ADDRESSES]
        )
    return address_list(text, problems)


_SPACE_OR_SPECIAL_RE = re.compile(r'[\s<>(),;:@\\"]')


def _plain_encoded_words(text: str) -> bool:
    """Whether no encoded word of ``text`` holds a blank or a special: then it reads the same as
    one word of a display name, which the simple forms may hold."""
    return not any(_SPACE_OR_SPECIAL_RE.search(word.group()) for word in ENCODED_WORD_RE.finditer(text))


def _address(name: str, email: str) -> Address:
    return Address(single_line(name, 512), single_line(email, 512).replace(" ", ""))


def address_list(text: str, problems: list[str]) -> tuple[Address, ...]:
    """``parse_addresses`` of an unfolded value, by its tokens (``parse_addresses`` reads the
    common simple forms faster, to the same result)."""
    addresses: list[Address] = []
    mailbox: list[_Token] = []
    in_angle = False
    for token in _tokens(text):
        kind = token.kind
        if not in_angle and (kind == "," or kind == ";" or kind == ":"):
            # ":" starts a group: what came before it is the group's name, not a mailbox.
            if kind != ":":
                _add_mailbox(mailbox, addresses, problems)
            mailbox = []
            if len(addresses) >= MAX_ADDRESSES:
                break
            continue
        if kind == "<":
            in_angle = True
        elif kind == ">":
            in_angle = False
        mailbox.append(token)
    _add_mailbox(mailbox, addresses, problems)
    return tuple(addresses[:MAX_ADDRESSES])


class _Token(NamedTuple):
    # "atom", "quoted", "encoded", "literal", "comment", or the special character itself.
    kind: str
    text: str  # as written (a quoted string with its quotes and escapes)
    spaced: bool  # whitespace (or a comment) came before it


# One token at a time, each alternative consuming up to a character it cannot contain: linear. An
# atom stops before "=?" so that an encoded word glued to text is a token of its own.
_TOKEN_RE = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<encoded>=\?[^?\s]{1,64}\?[bBqQ]\?[^?]*\?=)"
    r'|(?P<quoted>"(?:[^"\\]|\\.)*"?)'
    r"|(?P<literal>\[(?:[^\]\\]|\\.)*\]?)"
    r"|(?P<special>[<>,;:@.()])"
    r'|(?P<atom>(?:[^\s"()<>\[\],;:@.=\\]|=(?!\?)|\\.?)+|[\]=\\])'
)
_ESCAPE_RE = re.compile(r"\\(.)")


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    spaced = False
    while position < len(text):
        if text[position] == "(":
            end = _comment_end(text, position)
            closed = end - 1 if end <= len(text) else len(text)
            tokens.append(_Token("comment", text[position + 1 : closed], spaced))
            position, spaced = end, True
            continue
        match = _TOKEN_RE.match(text, position)
        assert match is not None  # the last alternative takes any character the others do not
        kind = match.lastgroup or "atom"
        if kind == "space":
            spaced = True
        else:
            tokens.append(_Token(match.group() if kind == "special" else kind, match.group(), spaced))
            spaced = False
        position = match.end()
    return tokens


def _comment_end(text: str, start: int) -> int:
    """The offset after the comment opened at ``start`` (nested comments included); beyond the end
    of ``text`` (``len(text) + 1``) when it is never closed."""
    depth = 0
    position = start
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return position + 1
        position += 1
    return len(text) + 1


def _add_mailbox(tokens: list[_Token], addresses: list[Address], problems: list[str]) -> None:
    kinds = [t.kind for t in tokens]
    name = ""
    if "<" in kinds:
        opened = kinds.index("<")
        closed = kinds.index(">", opened) if ">" in kinds[opened:] else len(tokens)
        name = _phrase(tokens[:opened], problems)
        inside = tokens[opened + 1 : closed]
        inside_kinds = kinds[opened + 1 : closed]
        if inside_kinds[:1] == ["@"] and ":" in inside_kinds:  # a source route: @a,@b:
            inside = inside[inside_kinds.index(":") + 1 :]
        email = _addr_spec(inside)
    else:
        email = _addr_spec(tokens)
    if not name:
        comments = [_unescaped(t.text) for t in tokens if t.kind == "comment"]
        name = decode_encoded_words(single_line(" ".join(comments)), problems)
    if email or name:
        addresses.append(_address(name, email))


def _phrase(tokens: list[_Token], problems: list[str]) -> str:
    """A display name: the words one space apart where the value had space, comments left out."""
    pieces: list[str] = []
    for token in tokens:
        if token.kind == "comment":
            continue
        word = _unescaped(token.text[1:].removesuffix('"')) if token.kind == "quoted" else token.text
        pieces.append((" " if token.spaced and pieces else "") + word)
    return decode_encoded_words(single_line("".join(pieces)), problems)


def _unescaped(text: str) -> str:
    return _ESCAPE_RE.sub(r"\1", text) if "\\" in text else text


def _addr_spec(tokens: list[_Token]) -> str:
    return "".join(t.text for t in tokens if t.kind not in ("comment", "<", ">"))


# The forms nearly all mail uses: "a@b", "Name <a@b>", "\"Name\" <a@b>", comma-separated, names
# with encoded words. Anything else (comments, groups, quoted commas, routes, escapes) is read by
# its tokens.
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
