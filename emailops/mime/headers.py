"""Header-level decoding: splitting a header block, RFC 2047 words, parameters, addresses, dates, ids.

Everything here works on bounded input and in time linear in it: header values are cut to
``MAX_HEADER_VALUE_BYTES`` before any decoding, and no regular expression here can backtrack more than
once over its input. Values returned are single-line (no CR, LF, NUL or other control character),
because they end up in replies and must never be able to inject a header.
"""

from __future__ import annotations

import binascii
import codecs
import email.utils
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache

from emailops.mime.model import Address

MAX_HEADERS = 1000
# A header block above this is kept as its fields (values cut to MAX_HEADER_VALUE_CHARS bytes).
MAX_HEADER_BLOCK_BYTES = 256 * 1024
MAX_HEADER_VALUE_BYTES = 64 * 1024
MAX_HEADER_VALUE_CHARS = 16 * 1024
MAX_ADDRESS_HEADER_CHARS = 16 * 1024
MAX_ADDRESSES = 1000
MAX_MESSAGE_IDS = 256

# Codecs that are slow by design on crafted input (quadratic IDNA / punycode decoding) or that are
# not charsets at all: treated as unknown.
_REFUSED_CODECS = frozenset({"idna", "punycode", "unicode_escape", "raw_unicode_escape", "unicode_internal"})
# Labels that real mail uses for a superset, as browsers do (WHATWG encoding standard).
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "windows-874": "cp874",
    "x-sjis": "cp932",
    "shift_jis": "cp932",
    "x-mac-roman": "mac_roman",
    "ascii": "utf-8",
    "us-ascii": "utf-8",
    "ansi_x3.4-1968": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
}

_CHARSET_LABEL_RE = re.compile(r"[^a-z0-9._:+-]")
# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: all become spaces.
_CONTROL_TO_SPACE = {cp: " " for cp in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]}


def problem_label(text: str, limit: int = 40) -> str:
    """A short, machine-friendly label for a value that goes into a problem string."""
    return _CHARSET_LABEL_RE.sub("_", text.strip().lower())[:limit] or "empty"


@lru_cache(maxsize=256)
def lookup_charset(label: str) -> str | None:
    """The Python codec name for a MIME charset label, or ``None`` if unknown or refused."""
    name = label.strip().strip("\"'").lower()
    if "*" in name:  # RFC 2231 language suffix: utf-8*en
        name = name.split("*", 1)[0]
    name = _CHARSET_ALIASES.get(name, name)
    if not name or len(name) > 64:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if info.name in _REFUSED_CODECS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def decode_bytes(data: bytes, charset: str | None, problems: list[str], *, final: bool = True) -> str:
    """Decode bytes declared in ``charset``; unknown or wrong charsets fall back and are recorded.

    Fallback order: UTF-8 (strict), then Latin-1 (which maps every byte). With ``final=False`` the data
    is a prefix, so an incomplete multi-byte sequence at its end is dropped instead of being an error.
    """
    codec = None
    if charset:
        codec = lookup_charset(charset)
        if codec is None:
            problems.append("charset-unknown:" + problem_label(charset))
    if codec is None:
        codec = "utf-8"
    if codec == "utf-8" and data.isascii():
        return data.decode("ascii")
    try:
        return codecs.getincrementaldecoder(codec)("strict").decode(data, final)
    except UnicodeDecodeError:
        pass
    except Exception:  # a third-party or exotic codec failing in its own way
        problems.append("charset-broken:" + problem_label(codec))
    if codec != "utf-8":
        try:
            text = codecs.getincrementaldecoder("utf-8")("strict").decode(data, final)
        except UnicodeDecodeError:
            pass
        else:
            if charset:
                problems.append("charset-mismatch:" + problem_label(charset))
            return text
    if charset:
        problems.append("charset-mismatch:" + problem_label(charset))
    return data.decode("latin-1")


def single_line(text: str, limit: int = MAX_HEADER_VALUE_CHARS) -> str:
    """Control characters and line breaks to spaces, whitespace runs collapsed, length bounded."""
    if not text.isascii() or not text.isprintable():
        text = text.translate(_CONTROL_TO_SPACE)
    text = " ".join(text.split())
    return text[:limit]


# --- RFC 2047 encoded words -------------------------------------------------------------------------

# Lenient: the encoded text may hold spaces (broken mailers), the charset may carry an RFC 2231
# language. Each alternative consumes up to a '?' that cannot be part of it, so matching is linear.
_ENCODED_WORD_RE = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?]*)\?=")
_BETWEEN_WORDS_RE = re.compile(r"[ \t\r\n]*")


def _decode_word_payload(encoding: str, payload: str, problems: list[str]) -> bytes:
    data = payload.encode("ascii", "ignore")
    if encoding in "bB":
        data = data.translate(None, b" \t\r\n")
        try:
            return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
        except binascii.Error:
            problems.append("encoded-word-broken")
            usable = len(data) - len(data) % 4
            try:
                return binascii.a2b_base64(data[:usable].rstrip(b"="))
            except binascii.Error:
                return b""
    return binascii.a2b_qp(data, header=True)


def decode_encoded_words(text: str, problems: list[str]) -> str:
    """Decode RFC 2047 encoded words, also where real mail breaks the rules.

    Adjacent encoded words separated by whitespace only are joined without it, and their bytes are
    concatenated before decoding when they share a charset (a multi-byte character split across two
    words decodes correctly). Words glued to text or inside quotes are decoded as well.
    """
    if "=?" not in text:
        return text
    pieces: list[str] = []
    pending_charset: str | None = None
    pending: list[bytes] = []
    position = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending:
            pieces.append(decode_bytes(b"".join(pending), pending_charset, problems))
            pending.clear()
        pending_charset = None

    for match in _ENCODED_WORD_RE.finditer(text):
        between = text[position : match.start()]
        if between and (not pending or _BETWEEN_WORDS_RE.fullmatch(between) is None):
            flush()
            pieces.append(between)
        charset = match.group(1).lower()
        if pending and charset != pending_charset:
            flush()
        pending_charset = charset
        pending.append(_decode_word_payload(match.group(2), match.group(3), problems))
        position = match.end()
    flush()
    pieces.append(text[position:])
    return "".join(pieces)


def decode_header_value(raw: bytes, problems: list[str], limit: int = MAX_HEADER_VALUE_CHARS) -> str:
    """A raw (possibly folded, possibly 8-bit) header value to a single-line decoded string."""
    if raw.isascii() and b"=?" not in raw:
        # The common case, fast: str.split() unfolds and collapses; any other control char (NUL
        # included) makes the text non-printable and takes the general path below.
        text = " ".join(raw.decode("ascii").split())
        if text.isprintable():
            return text[:limit]
    text = decode_encoded_words(header_text(raw, problems), problems)
    if "\n" in text or "\r" in text:
        problems.append("header-encoded-newline")  # an injection attempt, neutralised by single_line
    return single_line(text, limit)


def header_text(raw: bytes, problems: list[str]) -> str:
    """Raw header bytes to text without RFC 2047 decoding: unfolded, 8-bit as UTF-8 else Latin-1."""
    if b"\x00" in raw:
        problems.append("header-nul")
        raw = raw.replace(b"\x00", b"")
    if raw.isascii():
        text = raw.decode("ascii")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append("header-8bit")
            text = raw.decode("latin-1")
    # Unfold (a line break before a blank is removed); a bare CR is a space, never a line break.
    return text.replace("\r\n", "").replace("\n", "").replace("\r", " ")


# --- the header block -------------------------------------------------------------------------------


# A field as (lower-cased name, value): the value folded as in the message (line breaks kept),
# bounded to MAX_HEADER_VALUE_BYTES. A plain tuple: a message has dozens and a class per field
# cost a tenth of the parse.
RawHeader = tuple[str, bytes]


def split_header_block(
    raw: bytes, start: int, end: int, problems: list[str], max_headers: int = MAX_HEADERS
) -> tuple[list[RawHeader], int]:
    """Split the header block of ``raw[start:end]`` into fields; return them and the body's offset.

    The block ends at the first empty line. A line that is neither a field nor a continuation also
    ends it (as the stdlib's parser does) and is left to the body. Scanning is linear in the block;
    fields beyond ``max_headers`` are skipped (recorded) and values are cut to
    ``MAX_HEADER_VALUE_BYTES``.
    """
    fast = _split_well_formed(raw, start, end, max_headers)
    return fast if fast is not None else _split_line_by_line(raw, start, end, problems, max_headers)


def _split_line_by_line(
    raw: bytes, start: int, end: int, problems: list[str], max_headers: int
) -> tuple[list[RawHeader], int]:
    headers: list[RawHeader] = []
    truncated_names: list[str] = []
    position = start
    body_start = end
    if raw.startswith(b"From ", start):  # an mbox separator left in front of the message
        line_end = raw.find(b"\n", start, end)
        position = end if line_end < 0 else line_end + 1
    match_field = _FIELD_RE.match
    while position < end:
        found = match_field(raw, position, end)
        if found is not None:
            if len(headers) >= max_headers:
                # Past the cap the rest of the block is only skipped: find its end at C speed.
                problems.append("headers-truncated")
                body_start = _end_of_block(raw, position, end)
                break
            name = found.group(1).decode("ascii").lower()
            value_start, value_end = found.span(2)
            if value_end - value_start > MAX_HEADER_VALUE_BYTES:
                value_end = value_start + MAX_HEADER_VALUE_BYTES
                truncated_names.append(name)
            headers.append((name, raw[value_start:value_end]))
            position = found.end() + 1
            continue
        first = raw[position]
        if first == 0x0A or (first == 0x0D and raw.startswith(b"\r\n", position, end)):
            body_start = position + (1 if first == 0x0A else 2)
            break
        line_end = raw.find(b"\n", position, end)
        if first in (0x20, 0x09) and not headers:
            problems.append("header-continuation-orphan")
            position = end if line_end < 0 else line_end + 1
            continue
        # Neither a field, a continuation nor the empty line: the body starts here (as in the stdlib).
        problems.append("header-malformed-line")
        body_start = position
        break
    for cut in truncated_names[:8]:
        problems.append("header-value-truncated:" + problem_label(cut))
    return headers, min(body_start, end)


# A field: its name, optional blanks, a colon, then the value up to a line break that is not
# followed by a blank (continuation lines included, line breaks kept). Linear: no nested ambiguity.
_FIELD_NAME = rb"[!-9;-~]{1,256}"  # printable ASCII but the colon (RFC 5322 ftext), bounded
_FIELD_VALUE = rb"[^\n]*(?:\n[ \t][^\n]*)*"  # up to a line break not followed by a blank
_FIELD_RE = re.compile(rb"(" + _FIELD_NAME + rb")[ \t]*:(" + _FIELD_VALUE + rb")")
_BLOCK_END_RE = re.compile(rb"\n\r?\n")
# The common case in one pass each: a block made of fields only, then an empty line.
_FIELDS_ONLY_RE = re.compile(rb"(?:" + _FIELD_NAME + rb"[ \t]*:" + _FIELD_VALUE + rb"\n)*")
_FIELD_LINE_RE = re.compile(_FIELD_RE.pattern + rb"\n")


def _split_well_formed(
    raw: bytes, start: int, end: int, max_headers: int
) -> tuple[list[RawHeader], int] | None:
    """``split_header_block`` for a block of well-formed fields ended by an empty line, none of the
    limits reached, with the same result, at C speed; ``None`` for anything else."""
    if raw.startswith((b"From ", b" ", b"\t", b"\r", b"\n"), start, end):
        return None
    found = _BLOCK_END_RE.search(raw, start, end)
    if found is None:
        return None
    block_end = found.start() + 1  # after the last field's line break
    if block_end - start > MAX_HEADER_VALUE_BYTES or not _FIELDS_ONLY_RE.fullmatch(raw, start, block_end):
        return None
    fields = _FIELD_LINE_RE.findall(raw, start, block_end)
    if len(fields) > max_headers:
        return None
    return [(name.lower().decode("ascii"), value) for name, value in fields], found.end()


def _end_of_block(raw: bytes, position: int, end: int) -> int:
    """Offset after the first empty line at or after ``position`` (``end`` if there is none)."""
    if raw.startswith(b"\n", position, end) or raw.startswith(b"\r\n", position, end):
        return position + (1 if raw[position] == 0x0A else 2)
    found = _BLOCK_END_RE.search(raw, position, end)
    return end if found is None else found.end()


class HeaderBlock(Mapping[str, tuple[str, ...]]):
    """A message's header fields (lower-cased name -> decoded values in order), kept as the raw
    header block and decoded on first use.

    Most messages are indexed and never looked at by a rule, so decoding every field of every
    message (and storing the result) was a fifth of an initial sync; the index stores ``raw``
    instead. Decoding here records no problems: ``parse_message`` records them from the same block.
    """

    __slots__ = ("_decoded", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._decoded: dict[str, tuple[str, ...]] | None = None

    @classmethod
    def of(cls, raw: bytes, body_start: int, fields: list[RawHeader]) -> HeaderBlock:
        """The block ``raw[:body_start]`` whose fields are ``fields``; when it is above
        ``MAX_HEADER_BLOCK_BYTES`` (a hostile message), a block rebuilt from its first fields."""
        if body_start <= MAX_HEADER_BLOCK_BYTES:
            return cls(raw[:body_start])
        lines: list[bytes] = []
        total = 0
        for name, value in fields:
            # A cut value must not end in a line break: that would end the block there.
            line = name.encode("ascii") + b":" + value[:MAX_HEADER_VALUE_CHARS].rstrip(b"\r\n") + b"\n"
            total += len(line)
            if total > MAX_HEADER_BLOCK_BYTES:
                break
            lines.append(line)
        return cls(b"".join(lines))

    @classmethod
    def from_values(cls, values: Mapping[str, Iterable[str]]) -> HeaderBlock:
        """A block that decodes to ``values`` (for headers known only decoded)."""
        lines = [
            f"{name}: {single_line(value)}\r\n".encode()
            for name, found in values.items()
            for value in found
            if _FIELD_NAME_RE.fullmatch(name.encode("utf-8", "replace"))
        ]
        return cls(b"".join(lines))

    def _fields(self) -> dict[str, tuple[str, ...]]:
        if self._decoded is None:
            ignored: list[str] = []
            fields, _ = split_header_block(self.raw, 0, len(self.raw), ignored)
            decoded: dict[str, list[str]] = {}
            for name, value in fields:
                decoded.setdefault(name, []).append(decode_header_value(value, ignored))
            self._decoded = {name: tuple(values) for name, values in decoded.items()}
        return self._decoded

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._fields()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields())

    def __len__(self) -> int:
        return len(self._fields())

    def __repr__(self) -> str:
        return f"HeaderBlock({len(self.raw)} bytes)"

    def __reduce__(self) -> tuple[type[HeaderBlock], tuple[bytes]]:
        return HeaderBlock, (self.raw,)


_FIELD_NAME_RE = re.compile(_FIELD_NAME)


# --- structured values ------------------------------------------------------------------------------

_PARAM_RE = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')


def parse_params(text: str, problems: list[str]) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c*=utf-8''x%20y`` to the lower-cased main value and decoded parameters.

    Parameter names are lower-cased. RFC 2231 continuations (``name*0*``, ``name*1``) are joined and
    percent-decoded in their declared charset; RFC 2047 words in values (real-world filenames) decoded.
    """
    head, _, rest = text.partition(";")
    main = head.strip().lower()
    params: dict[str, str] = {}
    if not rest:
        return main, params
    extended: dict[str, list[tuple[int, bool, str]]] = {}
    for match in _PARAM_RE.finditer(";" + rest):
        key = match.group(1).lower()
        value = match.group(2).strip()
        if value.startswith('"'):
            value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
            if "\\" in value:
                value = re.sub(r"\\(.)", r"\1", value)
        if "*" in key:
            base, _, section = key.partition("*")
            encoded = section.endswith("*") or section == ""
            number = section.rstrip("*")
            index = int(number) if number.isdigit() and len(number) < 4 else 0
            extended.setdefault(base, []).append((index, encoded, value))
        elif key not in params:
            params[key] = value
    for base, sections in extended.items():
        sections.sort(key=lambda item: item[0])
        charset: str | None = None
        chunks: list[bytes] = []
        for position, (_, encoded, value) in enumerate(sections):
            if encoded and position == 0 and value.count("'") >= 2:
                charset, _, value = value.split("'", 2)
            if encoded:
                chunks.append(_percent_decode(value))
            else:
                chunks.append(value.encode("utf-8", "surrogateescape"))
        params[base] = decode_bytes(b"".join(chunks), charset or None, problems)
    for key, value in params.items():
        if "=?" in value:
            params[key] = decode_encoded_words(value, problems)
    return main, params


_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def _percent_decode(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"%" not in data:
        return data
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), data)


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

    return _ENCODED_WORD_RE.sub(replace, text), words


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
