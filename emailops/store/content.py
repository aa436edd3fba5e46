"""The index columns derived from a parsed message alone.

Kept free of SQLAlchemy so that the parsing helper process of a large sync computes them next to
the parse (see ``emailops.imap.parsing``), off the process that talks to IMAP and the database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from emailops.mime.model import Address, ParsedMessage


def _addresses(values: Iterable[Address]) -> str:
    return ", ".join(str(a) for a in values)


def content_columns(parsed: ParsedMessage) -> dict[str, object]:
    sender = parsed.sender
    return {
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "from_addr": sender.email if sender else "",
        "from_name": sender.name if sender else "",
        "addresses": _addresses((*parsed.from_, *parsed.to, *parsed.cc, *parsed.reply_to)),
        "to_addrs": _addresses(parsed.to),
        "cc_addrs": _addresses(parsed.cc),
        "date": parsed.date,
        "in_reply_to": parsed.in_reply_to,
        "references": " ".join(parsed.references),
        "list_id": parsed.list_id,
        "auto_submitted": parsed.auto_submitted,
        "thread_key": parsed.thread_key,
        "size": parsed.size,
        "headers_json": json.dumps(parsed.headers, ensure_ascii=False),
        "body_text": parsed.body_text,
        "has_attachments": bool(parsed.attachments),
        "truncated": parsed.truncated,
        "problems": " ".join(parsed.problems),
    }
