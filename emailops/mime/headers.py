"""One header value as text: unfolded, decoded, and on a single line.

Values returned are single-line (no CR, LF, NUL or other control character), because they end up in
replies and must never be able to inject a header. Work is linear in the value, which the header
block has already cut to ``header_block.MAX_HEADER_VALUE_BYTES``.
"""

from __future__ import annotations

from emailops.mime.charsets import decode_encoded_words

MAX_HEADER_VALUE_CHARS = 16 * 1024

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: all become spaces.
_CONTROL_TO_SPACE = {cp: " " for cp in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]}


def single_line(text: str, limit: int = MAX_HEADER_VALUE_CHARS) -> str:
    """Control characters and line breaks to spaces, whitespace runs collapsed, length bounded."""
    if not text.isascii() or not text.isprintable():
        text = text.translate(_CONTROL_TO_SPACE)
    text = " ".join(text.split())
    return text[:limit]


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
