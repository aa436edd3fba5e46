"""Bulk FETCH of message bodies and sizes, parsed from imaplib's answer directly.

imapclient parses every FETCH answer token by token in Python; for the bodies and sizes of
thousands of messages that doubled the cost of an initial sync. The same connection's stdlib
``imaplib.IMAP4.uid('FETCH', ...)`` (reached through ``imaplib_internals``) already splits the
answer into each message's head and its literal, and the few items we ask for around it are read
here with regular expressions. It also takes any message set, ``N:*`` included, which imapclient
4's ``fetch()`` refuses. Everything else still goes through imapclient.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from imapclient import IMAPClient

from emailops.imap.imaplib_internals import uid_command

_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_INTERNALDATE = re.compile(rb'\bINTERNALDATE "([^"]+)"')
_MODSEQ = re.compile(rb"\bMODSEQ \((\d+)\)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


class BulkFetchError(Exception):
    """The server answered the FETCH with NO or BAD."""


@dataclass(frozen=True)
class FetchedBody:
    uid: int
    flags: tuple[str, ...]
    internal_date: datetime | None
    modseq: int | None
    raw: bytes


def stored_flags(flags: Iterable[str]) -> tuple[str, ...]:
    """The flags the index keeps of a message."""
    # \Recent belongs to one IMAP session (RFC 3501 2.3.2), not to the message: not stored.
    return tuple(flag for flag in flags if flag.lower() != "\\recent")


def message_set(uids: Iterable[int]) -> str:
    """``1:3,7,9:10`` for [1, 2, 3, 7, 9, 10]: short command lines for long runs of UIDs."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[index], ordered[end]
        parts.append(str(first) if first == last else f"{first}:{last}")
        index = end + 1
    return ",".join(parts)


def _fetch(client: IMAPClient, messages: str, items: str) -> list[object]:
    typ, data = uid_command(client, "FETCH", messages, items)
    if typ != "OK":
        raise BulkFetchError(f"UID FETCH {items} failed: {data!r}")
    return [item for item in data if item is not None]


def fetch_sizes(client: IMAPClient, messages: str) -> dict[int, int]:
    """UID -> RFC822.SIZE for a message set such as ``"100:*"``."""
    sizes: dict[int, int] = {}
    for item in _fetch(client, messages, "(UID RFC822.SIZE)"):
        head = item[0] if isinstance(item, tuple) else item
        if not isinstance(head, bytes):
            continue
        uid, size = _UID.search(head), _SIZE.search(head)
        if uid and size:
            sizes[int(uid.group(1))] = int(size.group(1))
    return sizes


def fetch_bodies(client: IMAPClient, uids: Sequence[int], *, modseq: bool) -> list[FetchedBody]:
    """``BODY.PEEK[]`` (never sets \\Seen) with flags and internal date of ``uids``.

    Unsolicited FETCH answers (a flag change of another message) carry no body and are skipped.
    """
    wanted = set(uids)
    items = "(UID FLAGS INTERNALDATE" + (" MODSEQ" if modseq else "") + " BODY.PEEK[])"
    data = _fetch(client, message_set(uids), items)
    bodies: list[FetchedBody] = []
    for index, item in enumerate(data):
        if not isinstance(item, tuple) or len(item) != 2:
            continue
        head, raw = item
        # Items after the literal, if the server put any there, come in the next element.
        tail = data[index + 1] if index + 1 < len(data) and isinstance(data[index + 1], bytes) else b""
        meta = head + b" " + tail
        uid = _UID.search(meta)
        if uid is None or int(uid.group(1)) not in wanted or b"BODY[]" not in head:
            continue
        flags = _FLAGS.search(meta)
        date = _INTERNALDATE.search(meta)
        mod = _MODSEQ.search(meta)
        bodies.append(
            FetchedBody(
                uid=int(uid.group(1)),
                flags=tuple(flags.group(1).decode("utf-8", "replace").split()) if flags else (),
                internal_date=_internal_date(date.group(1)) if date else None,
                modseq=int(mod.group(1)) if mod else None,
                raw=raw,
            )
        )
    return bodies


@dataclass(frozen=True)
class FetchedMeta:
    """What a FETCH of metadata told about one UID."""

    flags: tuple[str, ...]
    modseq: int | None
    internal_date: datetime | None
    # The literal of ``BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]``, when asked for.
    message_id_header: bytes | None


_RESPONSE_START = re.compile(rb"\d+ \(")


def fetch_meta(
    client: IMAPClient,
    messages: str,
    *,
    modseq: bool,
    changed_since: int | None = None,
    internal_date: bool = False,
    message_id_header: bool = False,
) -> dict[int, FetchedMeta]:
    """UID -> flags (and MODSEQ, INTERNALDATE, the Message-ID header) of a message set.

    Only answers that carry a UID count. A server announces flag changes made by other sessions
    with untagged FETCH answers that name the message by its sequence number alone (Dovecot does
    so even within a UID FETCH); imapclient keys those by that number as if it were a UID, and
    merges them into the answer of the message whose UID it happens to be: another message's
    flags. The changes skipped here are seen by the next pass (HIGHESTMODSEQ moved on).
    """
    items = ["UID", "FLAGS"]
    if modseq:
        items.append("MODSEQ")
    if internal_date:
        items.append("INTERNALDATE")
    if message_id_header:
        items.append("BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]")
    request = "(" + " ".join(items) + ")"
    if changed_since is not None:
        request += f" (CHANGEDSINCE {changed_since})"
    data = _fetch(client, messages, request)
    found: dict[int, FetchedMeta] = {}
    index = 0
    while index < len(data):
        item = data[index]
        index += 1
        literal: bytes | None = None
        if isinstance(item, tuple) and len(item) == 2:
            head, literal = item
            tail = data[index] if index < len(data) else None
            # The rest of this answer after its literal, unless that element is the next answer.
            if isinstance(tail, bytes) and not _RESPONSE_START.match(tail):
                head += b" " + tail
                index += 1
            meta = head
        elif isinstance(item, bytes):
            meta = item
        else:
            continue
        uid = _UID.search(meta)
        flags = _FLAGS.search(meta)
        if uid is None or flags is None:  # every answer to this FETCH has both
            continue
        mod = _MODSEQ.search(meta)
        date = _INTERNALDATE.search(meta)
        number = int(uid.group(1))
        earlier = found.get(number)
        if literal is None and earlier is not None:  # a later announcement: keep the header
            literal = earlier.message_id_header
        found[number] = FetchedMeta(
            flags=tuple(flags.group(1).decode("utf-8", "replace").split()),
            modseq=int(mod.group(1)) if mod else None,
            internal_date=_internal_date(date.group(1)) if date else None,
            message_id_header=literal if message_id_header else None,
        )
    return found


_MONTHS = {
    name: number
    for number, name in enumerate(
        (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"),
        start=1,
    )
}
_DATE_TIME = re.compile(rb"\s*(\d{1,2})-(\w{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")


def _internal_date(value: bytes) -> datetime | None:
    """RFC 3501 date-time (``17-Jul-1996 02:44:25 -0700``) in UTC; strptime was a tenth of a sync."""
    match = _DATE_TIME.match(value)
    month = _MONTHS.get(match.group(2).title()) if match else None
    if match is None or month is None:
        return None
    day, _, year, hour, minute, second, sign, offset_hours, offset_minutes = match.groups()
    offset = timedelta(hours=int(offset_hours), minutes=int(offset_minutes))
    try:
        local = datetime(int(year), month, int(day), int(hour), int(minute), int(second), tzinfo=UTC)
    except ValueError:
        return None
    return local - offset if sign == b"+" else local + offset
