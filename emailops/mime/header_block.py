"""The header block: split into raw fields (offsets into the message), and decoded on demand.

Scanning is linear in the block and bounded: at most ``MAX_HEADERS`` fields, each value cut to
``MAX_HEADER_VALUE_BYTES`` before any decoding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from emailops.mime.charsets import problem_label
from emailops.mime.headers import MAX_HEADER_VALUE_CHARS, decode_header_value, single_line

MAX_HEADERS = 1000
# A header block above this is kept as its fields (values cut to MAX_HEADER_VALUE_CHARS bytes).
MAX_HEADER_BLOCK_BYTES = 256 * 1024
MAX_HEADER_VALUE_BYTES = 64 * 1024


# A field as (lower-cased name, value): the value folded as in the message (line breaks kept),
# bounded to MAX_HEADER_VALUE_BYTES. A plain tuple: a message has dozens and a class per field
# cost a tenth of the parse.
RawHeader = tuple[str, bytes]


# A field: its name, optional blanks, a colon, then the value up to a line break that is not
# followed by a blank (continuation lines included, line breaks kept). Linear: no nested ambiguity.
_FIELD_NAME = rb"[!-9;-~]{1,256}"  # printable ASCII but the colon (RFC 5322 ftext), bounded
_FIELD_VALUE = rb"[^\n]*(?:\n[ \t][^\n]*)*"  # up to a line break not followed by a blank
_FIELD_RE = re.compile(rb"(" + _FIELD_NAME + rb")[ \t]*:(" + _FIELD_VALUE + rb")")
_BLOCK_END_RE = re.compile(rb"\n\r?\n")
# The common case in one pass each: a block made of fields only, then an empty line.
_FIELDS_ONLY_RE = re.compile(rb"(?:" + _FIELD_NAME + rb"[ \t]*:" + _FIELD_VALUE + rb"\n)*")
_FIELD_LINE_RE = re.compile(_FIELD_RE.pattern + rb"\n")
_FIELD_NAME_RE = re.compile(_FIELD_NAME)


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
