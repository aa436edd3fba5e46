"""What the parser extracts from one message: the contract between parsing, the index and the rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Address:
    """A decoded mailbox. ``email`` is as written (compare with ``.lower()``); ``name`` may be ``""``."""

    name: str
    email: str

    def __str__(self) -> str:
        """The mailbox as RFC 5322 writes it: a name with specials (``Doe, John``) is quoted, so the
        text reads back as this one address."""
        if not self.name:
            return self.email
        name = self.name
        if _NEEDS_QUOTES.search(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{name} <{self.email}>"


# RFC 5322 specials (and the quote and backslash themselves): a display name holding one is quoted.
_NEEDS_QUOTES = re.compile(r'[()<>\[\]:;@\\,."]')


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str
    size: int


@dataclass(frozen=True)
class ParsedMessage:
    """One message, decoded as well as possible. Never raises for bad input: problems are listed.

    Header values are decoded (RFC 2047), single-line (CR, LF and NUL removed) and bounded in length.
    ``headers`` maps each lower-cased header name to its values in order (bounded in count), for the
    rules and the robot checks; the parser gives a ``header_block.HeaderBlock``, which decodes the raw
    header block on first use. ``return_path`` is ``None`` when there is no Return-Path header and
    ``""`` for the null return path ``<>``.
    """

    message_id: str | None
    subject: str
    from_: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    date: datetime | None
    in_reply_to: str | None
    references: tuple[str, ...]
    list_id: str | None
    auto_submitted: str | None
    return_path: str | None
    headers: Mapping[str, tuple[str, ...]]
    body_text: str
    attachments: tuple[Attachment, ...]
    size: int
    thread_key: str
    truncated: bool = False
    problems: tuple[str, ...] = field(default=())

    @property
    def sender(self) -> Address | None:
        return self.from_[0] if self.from_ else None

    def header(self, name: str) -> str | None:
        """The first value of a header, or ``None``."""
        values = self.headers.get(name.lower())
        return values[0] if values else None
