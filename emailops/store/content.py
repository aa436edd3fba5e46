"""What the index stores of a parsed message, derived from the parsed message alone.

Kept free of SQLAlchemy so that the parsing helper process of a large sync computes it next to the
parse (see ``emailops.imap.parsing``), off the process that talks to IMAP and the database. It is
made of plain values (a dict, tuples, bytes) because it crosses a process boundary by pickle, where
a dataclass per message cost more than the parse of its headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from emailops.mime.header_block import HeaderBlock
from emailops.mime.model import Address, ParsedMessage
from emailops.store.fulltext import message_terms


class MessageContent(NamedTuple):
    columns: dict[str, object]  # the content columns of the message's ``messages`` row
    attachments: tuple[tuple[str | None, str, int], ...]  # (filename, content type, size)
    parse_seconds: float = 0.0  # what parsing this message took (told in its "message indexed" line)
    search_terms: str = ""  # what the full-text index keeps of it (``fulltext.message_terms``)


def _addresses(values: Iterable[Address]) -> str:
    return ", ".join(str(a) for a in values)


def address_lists(by_field: Mapping[str, Iterable[Address]]) -> dict[str, list[list[str]]]:
    """The ``messages.address_lists`` value: each header's addresses as ``[name, email]`` pairs in
    order (``by_field``: "from", "to", "cc", "reply-to"), headers without an address left out."""
    lists = {field: [[a.name, a.email] for a in found] for field, found in by_field.items()}
    return {field: pairs for field, pairs in lists.items() if pairs}


def header_block(parsed: ParsedMessage) -> bytes:
    """The raw header block the index keeps (rebuilt from decoded values if that is all there is)."""
    headers = parsed.headers
    return (headers if isinstance(headers, HeaderBlock) else HeaderBlock.from_values(headers)).raw


def message_content(parsed: ParsedMessage) -> MessageContent:
    sender = parsed.sender
    columns: dict[str, object] = {
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "from_addr": sender.email if sender else "",
        "from_name": sender.name if sender else "",
        "addresses": _addresses((*parsed.from_, *parsed.to, *parsed.cc, *parsed.reply_to)),
        "address_lists": address_lists(
            {"from": parsed.from_, "to": parsed.to, "cc": parsed.cc, "reply-to": parsed.reply_to}
        ),
        "date": parsed.date,
        "in_reply_to": parsed.in_reply_to,
        "references": " ".join(parsed.references),
        "list_id": parsed.list_id,
        "auto_submitted": parsed.auto_submitted,
        "thread_key": parsed.thread_key,
        "size": parsed.size,
        "header_block": header_block(parsed),
        "body_text": parsed.body_text,
        "has_attachments": bool(parsed.attachments),
        "truncated": parsed.truncated,
        "problems": " ".join(parsed.problems),
    }
    attachments = tuple((a.filename, a.content_type, a.size) for a in parsed.attachments)
    return MessageContent(columns, attachments, search_terms=message_terms(parsed))
