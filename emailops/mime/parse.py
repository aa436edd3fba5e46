"""``parse_message``: raw RFC 5322 bytes to a ``ParsedMessage``, robustly and fast.

Why not ``email.message_from_bytes``: the stdlib's ``policy.default`` header parsing is slow on real mail
and pathological on crafted headers, and its parser copies every part's payload. Here the message is
walked in place: headers are split by offsets (``header_block.split_header_block``), multipart boundaries
are found with ``bytes.find`` on the original buffer, only text parts are decoded (and only as much of
them as the body budget needs), and attachment sizes are computed from the encoded bytes without
decoding them. Time is linear in the message and bounded by the limits below; memory is the raw
message plus bounded text.

Bounds (each one recorded in ``problems`` when hit):

- ``max_message_bytes``: a bigger message is indexed from its headers, its structure (attachment
  names and sizes) and the text found in its first ``max_message_bytes`` (``message-truncated``);
- ``max_body_chars``: length of ``body_text`` (``body-truncated``);
- ``MAX_DEPTH`` nested multiparts / message/rfc822 (``nesting-too-deep``), ``MAX_PARTS`` parts
  (``parts-truncated``), a boundary-search budget of a few times the message size
  (``structure-truncated``), ``header_block.MAX_HEADERS`` fields kept (``headers-truncated``) and
  ``header_block.MAX_HEADER_VALUE_BYTES`` per value (``header-value-truncated:NAME``).

``truncated`` is true when the indexed text may be incomplete: the message was over
``max_message_bytes``, its text over ``max_body_chars`` or its structure search over budget.

Other problems: ``header-missing:{from,date,message-id}``, ``header-duplicate:NAME``, ``header-nul``,
``header-8bit`` (not UTF-8, read as Latin-1), ``header-malformed-line``, ``header-continuation-orphan``,
``header-encoded-newline`` (an encoded CR/LF, i.e. an injection attempt, neutralised),
``encoded-word-broken``, ``charset-unknown:LABEL``, ``charset-mismatch:LABEL``, ``charset-broken:CODEC``,
``base64-broken``, ``quoted-printable-broken``, ``encoding-unknown:CTE``, ``body-nul``,
``content-type-invalid``, ``multipart-boundary-missing``, ``multipart-no-parts``,
``multipart-unterminated``, ``date-invalid``, ``addresses-truncated``,
``problems-truncated`` (more than ``MAX_PROBLEMS`` distinct ones), and ``parser-error:TYPE`` if a bug
escaped all of the above (the message is then indexed with empty fields rather than lost).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

from emailops.mime.addresses import parse_addresses, parse_date, parse_message_ids
from emailops.mime.charsets import decode_bytes, problem_label
from emailops.mime.header_block import HeaderBlock, RawHeader, split_header_block
from emailops.mime.headers import MAX_HEADER_VALUE_CHARS, decode_header_value, header_text, single_line
from emailops.mime.html_text import html_to_text
from emailops.mime.model import Address, Attachment, ParsedMessage
from emailops.mime.parameters import parse_params
from emailops.mime.threading import thread_key

DEFAULT_MAX_MESSAGE_BYTES = 25 * 1024 * 1024
DEFAULT_MAX_BODY_CHARS = 200_000
MAX_DEPTH = 32
MAX_PARTS = 512
MAX_PROBLEMS = 64
MAX_PART_HEADERS = 64
MAX_FILENAME_CHARS = 1024
MAX_BOUNDARY_LENGTH = 256
# Scan-budget bytes charged per boundary-like string examined, so that a million near-delimiter
# lines ("--boundaryX") cannot keep the Python loop busy for seconds.
CANDIDATE_COST = 4096
# Quoted-printable attachments up to this size are decoded to measure them; bigger ones are estimated.
QP_MEASURE_LIMIT = 1024 * 1024
# An HTML body's markup is typically several times its text; this many bytes per body char are read.
HTML_BYTES_PER_CHAR = 4

# Header fields RFC 5322 allows once; a second occurrence is recorded (the first one is used).
_SINGLETON_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references")
_REQUIRED_HEADERS = ("from", "date", "message-id")
_TEXT_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_QP_BROKEN_RE = re.compile(rb"=(?![0-9A-Fa-f]{2}|[ \t]*\r?\n|[ \t]*\r?$)")
_BASE64_JUNK = bytes(c for c in range(256) if not (chr(c).isalnum() and c < 128) and c not in b"+/")
_RETURN_PATH_RE = re.compile(r"<([^<>]*)>")
_CONTENT_TYPE_RE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")


def parse_message(
    raw: bytes,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
) -> ParsedMessage:
    """Parse one message. Never raises: whatever cannot be decoded is listed in ``.problems``."""
    try:
        data = raw if isinstance(raw, bytes) else bytes(raw)
        return _parse(data, max(0, max_message_bytes), max(0, max_body_chars))
    except Exception as exc:  # last line of defence: one message must never stop a worker
        return _unparsable(raw, exc)


def _parse(raw: bytes, max_message_bytes: int, max_body_chars: int) -> ParsedMessage:
    problems: list[str] = []
    fields, body_start = split_header_block(raw, 0, len(raw), problems)
    first: dict[str, bytes] = {}
    for name, value in fields:
        if name not in first:
            first[name] = value
        elif name in _SINGLETON_HEADERS:
            problems.append("header-duplicate:" + name)
    for name in _REQUIRED_HEADERS:
        if name not in first:
            problems.append("header-missing:" + name)
    # The other fields are decoded only when a rule looks at them (HeaderBlock); what decoding
    # them would report (NUL, 8-bit, broken encoded words) is recorded now, from the fields that
    # can have such a problem at all.
    block = raw[:body_start]
    if b"=?" in block or b"\x00" in block or not block.isascii():
        for _, value in fields:
            if b"=?" in value or b"\x00" in value or not value.isascii():
                decode_header_value(value, problems)

    walker = _BodyWalker(raw, min(len(raw), max_message_bytes), max_body_chars, problems)
    if len(raw) > max_message_bytes:
        problems.append("message-truncated")
    walker.walk_entity(fields, body_start, len(raw), depth=0, default_type="text/plain")
    body_text = walker.body_text()

    subject = _decoded(first, "subject", problems) or ""
    message_ids = parse_message_ids(first["message-id"], problems) if "message-id" in first else ()
    message_id = message_ids[0] if message_ids else None
    parents = parse_message_ids(first["in-reply-to"], problems) if "in-reply-to" in first else ()
    in_reply_to = parents[0] if parents else None
    references = parse_message_ids(first["references"], problems) if "references" in first else ()

    return ParsedMessage(
        message_id=message_id,
        subject=subject,
        from_=_addresses(first, "from", problems),
        to=_addresses(first, "to", problems),
        cc=_addresses(first, "cc", problems),
        reply_to=_addresses(first, "reply-to", problems),
        date=parse_date(first["date"], problems) if "date" in first else None,
        in_reply_to=in_reply_to,
        references=references,
        list_id=_decoded(first, "list-id", problems),
        auto_submitted=_decoded(first, "auto-submitted", problems),
        return_path=_return_path(_decoded(first, "return-path", problems)),
        headers=HeaderBlock.of(raw, body_start, fields),
        body_text=body_text,
        attachments=tuple(walker.attachments),
        size=len(raw),
        thread_key=thread_key(message_id, in_reply_to, references, subject),
        truncated=len(raw) > max_message_bytes or walker.body_cut,
        problems=_bounded_problems(problems),
    )


def _addresses(first: dict[str, bytes], name: str, problems: list[str]) -> tuple[Address, ...]:
    value = first.get(name)
    return parse_addresses(value, problems) if value is not None else ()


def _decoded(first: dict[str, bytes], name: str, problems: list[str]) -> str | None:
    """The first value of header ``name``, decoded; ``None`` if there is no such header."""
    value = first.get(name)
    return None if value is None else decode_header_value(value, problems)


def _return_path(value: str | None) -> str | None:
    if value is None:
        return None
    match = _RETURN_PATH_RE.search(value)
    return match.group(1).strip() if match else value.strip()


def _bounded_problems(problems: list[str]) -> tuple[str, ...]:
    unique = tuple(dict.fromkeys(problems))
    if len(unique) > MAX_PROBLEMS:
        return (*unique[: MAX_PROBLEMS - 1], "problems-truncated")
    return unique


def _unparsable(raw: object, exc: Exception) -> ParsedMessage:
    size = len(raw) if isinstance(raw, bytes | bytearray | memoryview) else 0
    return ParsedMessage(
        message_id=None,
        subject="",
        from_=(),
        to=(),
        cc=(),
        reply_to=(),
        date=None,
        in_reply_to=None,
        references=(),
        list_id=None,
        auto_submitted=None,
        return_path=None,
        headers=HeaderBlock(b""),
        body_text="",
        attachments=(),
        size=size,
        thread_key=thread_key(None, None, (), ""),
        truncated=True,
        problems=("parser-error:" + problem_label(type(exc).__name__),),
    )


@dataclass(slots=True)
class _Entity:
    content_type: str
    params: dict[str, str]
    encoding: str
    disposition: str
    filename: str | None


@dataclass
class _BodyWalker:
    """Walks the MIME tree of ``raw`` by offsets, collecting body text and attachments."""

    raw: bytes
    text_end: int  # text is only decoded from raw[:text_end]
    max_body_chars: int
    problems: list[str]
    attachments: list[Attachment] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)
    plain_chars: int = 0
    html_parts: list[tuple[int, int, str, str | None]] = field(default_factory=list)
    body_cut: bool = False
    parts: int = 0
    scan_budget: int = 0

    def __post_init__(self) -> None:
        # Boundary searches over nested parts rescan inner regions once per level; this caps the total.
        self.scan_budget = 4 * len(self.raw) + 4 * 1024 * 1024

    # --- structure ---------------------------------------------------------------------------------

    def walk_entity(
        self, fields: list[RawHeader], body_start: int, body_end: int, depth: int, default_type: str
    ) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            self.problems.append("parts-truncated")
            return
        entity = self._entity(fields, default_type)
        maintype = entity.content_type.partition("/")[0]
        if maintype == "multipart":
            self._walk_multipart(entity, body_start, body_end, depth)
        elif (
            entity.content_type in ("message/rfc822", "message/global") and entity.encoding in _TEXT_ENCODINGS
        ):
            if entity.disposition == "attachment":
                self._add_attachment(entity, body_start, body_end)
            if depth >= MAX_DEPTH:
                self.problems.append("nesting-too-deep")
                return
            inner, inner_body = split_header_block(
                self.raw, body_start, body_end, self.problems, MAX_PART_HEADERS
            )
            self.walk_entity(inner, inner_body, body_end, depth + 1, "text/plain")
        else:
            self._leaf(entity, body_start, body_end)

    def _entity(self, fields: list[RawHeader], default_type: str) -> _Entity:
        content_type, params = default_type, dict[str, str]()
        seen_type = False
        encoding = ""
        disposition, disposition_params = "", dict[str, str]()
        for name, value in fields:
            if name == "content-type" and not seen_type:
                seen_type = True
                declared, params = parse_params(header_text(value, self.problems), self.problems)
                if _CONTENT_TYPE_RE.fullmatch(declared):
                    content_type = declared
                else:
                    self.problems.append("content-type-invalid")
            elif name == "content-transfer-encoding" and not encoding:
                encoding = single_line(header_text(value, self.problems), 64).lower()
            elif name == "content-disposition" and not disposition:
                disposition, disposition_params = parse_params(
                    header_text(value, self.problems), self.problems
                )
        filename = disposition_params.get("filename") or params.get("name")
        return _Entity(
            content_type=content_type,
            params=params,
            encoding=encoding,
            disposition=disposition,
            filename=single_line(filename, MAX_FILENAME_CHARS) if filename else None,
        )

    def _walk_multipart(self, entity: _Entity, body_start: int, body_end: int, depth: int) -> None:
        if depth >= MAX_DEPTH:
            self.problems.append("nesting-too-deep")
            return
        boundary = entity.params.get("boundary", "").strip()
        if not boundary or len(boundary) > MAX_BOUNDARY_LENGTH:
            self.problems.append("multipart-boundary-missing")
            self._leaf(_Entity("text/plain", {}, "", "", None), body_start, body_end)
            return
        parts = self._split_parts(boundary.encode("utf-8", "surrogateescape"), body_start, body_end)
        if not parts:
            if self.scan_budget >= 0:
                self.problems.append("multipart-no-parts")
            self._leaf(_Entity("text/plain", {}, "", "", None), body_start, body_end)
            return
        child_type = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
        for part_start, part_end in parts:
            if self.parts >= MAX_PARTS:
                self.problems.append("parts-truncated")
                return
            fields, part_body = split_header_block(
                self.raw, part_start, part_end, self.problems, MAX_PART_HEADERS
            )
            self.walk_entity(fields, part_body, part_end, depth + 1, child_type)

    def _split_parts(self, boundary: bytes, start: int, end: int) -> list[tuple[int, int]]:
        """Offsets of the parts between ``--boundary`` lines (search bounded by the scan budget).

        A delimiter is ``--boundary`` at the start of a line followed by optional whitespace, or by
        ``--`` for the last one. The line break before a delimiter belongs to it, not to the part.
        """
        raw = self.raw
        marker = b"--" + boundary
        parts: list[tuple[int, int]] = []
        part_start = -1
        position = start
        closed = False
        while position < end:
            found = raw.find(marker, position, end)
            self.scan_budget -= (end if found < 0 else found) - position
            if self.scan_budget < 0:
                # Keep what was found; the open part runs to the end, as if unterminated.
                self.problems.append("structure-truncated")
                self.body_cut = True
                break
            if found < 0:
                break
            after = found + len(marker)
            self.scan_budget -= CANDIDATE_COST
            if found != start and raw[found - 1] != 0x0A:
                position = after
                continue
            is_close = raw.startswith(b"--", after, end)
            line_end = raw.find(b"\n", after, min(end, after + MAX_BOUNDARY_LENGTH))
            if line_end < 0:
                line_end = end if end - after < MAX_BOUNDARY_LENGTH else -1
            if line_end < 0 or raw[after + (2 if is_close else 0) : line_end].strip():
                position = after  # a longer boundary sharing this prefix, or text that merely starts so
                continue
            if part_start >= 0:
                part_end = found
                if part_end > part_start and raw[part_end - 1] == 0x0A:
                    part_end -= 1
                if part_end > part_start and raw[part_end - 1] == 0x0D:
                    part_end -= 1
                parts.append((part_start, part_end))
                if len(parts) > MAX_PARTS:
                    self.problems.append("parts-truncated")
                    return parts
            if is_close:
                closed = True
                break
            part_start = min(line_end + 1, end)
            position = part_start
        if not closed and part_start >= 0:
            if self.scan_budget >= 0:
                self.problems.append("multipart-unterminated")
            parts.append((part_start, end))
        return parts

    # --- leaves ------------------------------------------------------------------------------------

    def _leaf(self, entity: _Entity, start: int, end: int) -> None:
        # text/plain and text/html are body text unless marked as attachments (a filename alone
        # does not make one: several mailers name their inline body parts).
        is_body_type = entity.content_type in ("text/plain", "text/html")
        if entity.disposition == "attachment" or not is_body_type:
            self._add_attachment(entity, start, end)
        elif entity.content_type == "text/html":
            self.html_parts.append((start, end, entity.encoding, entity.params.get("charset")))
        else:
            self._add_plain(entity, start, end)

    def _add_attachment(self, entity: _Entity, start: int, end: int) -> None:
        self.attachments.append(
            Attachment(
                filename=entity.filename,
                content_type=entity.content_type,
                size=self._decoded_size(start, end, entity.encoding),
            )
        )

    def _decoded_size(self, start: int, end: int, encoding: str) -> int:
        """The decoded size of raw[start:end], counted on the encoded bytes (no decoded copy)."""
        raw = self.raw
        if encoding == "base64":
            whitespace = sum(raw.count(char, start, end) for char in (b"\n", b"\r", b" ", b"\t"))
            padding = min(2, raw.count(b"=", max(start, end - 8), end))
            return max(0, (end - start - whitespace) * 3 // 4 - padding)
        if encoding == "quoted-printable":
            if end - start <= QP_MEASURE_LIMIT:
                return len(binascii.a2b_qp(raw[start:end]))
            return max(0, end - start - 2 * raw.count(b"=", start, end))
        return end - start

    def _add_plain(self, entity: _Entity, start: int, end: int) -> None:
        budget = self.max_body_chars - self.plain_chars
        if budget <= 0:
            if end > start:
                self.body_cut = True
                self.problems.append("body-truncated")
            return
        text = self._decode_text(start, end, entity.encoding, entity.params.get("charset"), budget)
        if text.strip():
            self.plain.append(text)
            self.plain_chars += len(text) + 2

    def _decode_text(self, start: int, end: int, encoding: str, charset: str | None, budget: int) -> str:
        """Decode at most ``budget`` characters of a text part's raw[start:end], reading a bounded prefix."""
        partial = False
        if end > self.text_end:
            end = max(start, self.text_end)
            partial = True
        limit = budget * 4  # the most bytes a character takes in any charset mail uses
        if encoding == "base64":
            limit = limit * 4 // 3 + 4
        elif encoding == "quoted-printable":
            limit *= 3
        if end - start > limit:
            cut = start + limit
            line_start = self.raw.rfind(b"\n", start, cut)
            end = line_start + 1 if line_start > start else cut
            partial = True
        data = self.raw[start:end]
        if encoding == "base64":
            data = self._decode_base64(data, partial)
        elif encoding == "quoted-printable":
            if _QP_BROKEN_RE.search(data):
                self.problems.append("quoted-printable-broken")
            data = binascii.a2b_qp(data)
        elif encoding not in _TEXT_ENCODINGS:
            self.problems.append("encoding-unknown:" + problem_label(encoding))
        text = decode_bytes(data, charset, self.problems, final=not partial)
        # Removed after decoding: in UTF-16 and UTF-32 zero bytes are part of the characters.
        if "\x00" in text:
            self.problems.append("body-nul")
            text = text.replace("\x00", "")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if partial or len(text) > budget:
            self.body_cut = True
            if end < self.text_end or len(text) > budget:
                self.problems.append("body-truncated")
        return text[:budget]

    def _decode_base64(self, data: bytes, partial: bool) -> bytes:
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            if not partial:
                self.problems.append("base64-broken")
        cleaned = data.translate(None, _BASE64_JUNK + b"=")
        usable = len(cleaned) - (len(cleaned) % 4 == 1)
        cleaned = cleaned[:usable]
        try:
            return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
        except binascii.Error:
            return b""

    # --- result ------------------------------------------------------------------------------------

    def body_text(self) -> str:
        """Plain-text parts joined; if there is no text in them, the text of the HTML parts."""
        if self.plain:
            return "\n\n".join(self.plain)[: self.max_body_chars]
        texts: list[str] = []
        remaining = self.max_body_chars
        for start, end, encoding, charset in self.html_parts:
            if remaining <= 0:
                self.body_cut = True
                self.problems.append("body-truncated")
                break
            html = self._decode_text(start, end, encoding, charset, remaining * HTML_BYTES_PER_CHAR)
            text = html_to_text(html)
            if text:
                texts.append(text[:remaining])
                remaining -= len(text) + 2
        return "\n\n".join(texts)[: self.max_body_chars]


__all__ = ["DEFAULT_MAX_BODY_CHARS", "DEFAULT_MAX_MESSAGE_BYTES", "MAX_HEADER_VALUE_CHARS", "parse_message"]
