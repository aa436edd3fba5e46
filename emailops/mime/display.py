"""One message's parts for the operator to read: its HTML body and its attachments, bytes included.

The index keeps no message whole (text, headers and attachment names only), so the console
reads these from the raw message fetched from IMAP. One message at a time, on an operator's
request: the standard library's parser (``policy.default``) is fast enough for that.
"""

from __future__ import annotations

import email
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._ -]+")


@dataclass(frozen=True)
class AttachmentPart:
    filename: str  # as the message names it (or "attachment-N" when it names none)
    content_type: str
    content_id: str | None  # without the angle brackets
    data: bytes

    @property
    def safe_filename(self) -> str:
        """The filename reduced to letters, digits, dot, dash, underscore and space (for a header)."""
        kept = _UNSAFE_FILENAME.sub("_", self.filename).strip(" .")
        return kept[:120] or "attachment"


@dataclass(frozen=True)
class DisplayParts:
    html: str | None  # the first HTML body part, decoded (None: the message has none)
    attachments: tuple[AttachmentPart, ...]  # attachments and inline parts with a Content-ID


def display_parts(raw: bytes) -> DisplayParts:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    html: str | None = None
    found: list[AttachmentPart] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        content_type = part.get_content_type()
        disposition = part.get_content_disposition()
        content_id = part.get("Content-ID")
        if content_type == "text/html" and disposition != "attachment" and html is None:
            html = _text(part)
            continue
        if disposition != "attachment" and content_id is None and part.get_filename() is None:
            continue  # a body part (its text is what the index keeps)
        data = part.get_payload(decode=True)
        found.append(
            AttachmentPart(
                filename=part.get_filename() or f"attachment-{len(found) + 1}",
                content_type=content_type,
                content_id=str(content_id).strip().strip("<>") if content_id else None,
                data=data if isinstance(data, bytes) else b"",
            )
        )
    return DisplayParts(html, tuple(found))


def _text(part: EmailMessage) -> str:
    data = part.get_payload(decode=True)
    raw = data if isinstance(data, bytes) else b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return raw.decode(charset, errors="replace")
    except LookupError:  # an unknown charset label
        return raw.decode("utf-8", errors="replace")
