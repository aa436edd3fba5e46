"""Builds ParsedMessage values for the rules and replies unit tests (no tests here)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from emailops.config import ReplyConfig
from emailops.mime.model import Address, ParsedMessage


def parsed_message(**overrides: Any) -> ParsedMessage:
    """A plain personal message from alice@example.org to me@example.net; override any field.

    ``headers`` given as overrides are merged over the defaults (names lower-cased).
    """
    extra_headers = {k.lower(): tuple(v) for k, v in overrides.pop("headers", {}).items()}
    values: dict[str, Any] = {
        "message_id": "<m1@example.org>",
        "subject": "Need help with my order",
        "from_": (Address("Alice Example", "alice@example.org"),),
        "to": (Address("", "me@example.net"),),
        "cc": (),
        "reply_to": (),
        "date": datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
        "in_reply_to": None,
        "references": (),
        "list_id": None,
        "auto_submitted": None,
        "return_path": "alice@example.org",
        "body_text": "Hello,\nmy order 42 did not arrive.\n",
        "attachments": (),
        "size": 1234,
        "thread_key": "<m1@example.org>",
    }
    values.update(overrides)
    headers = {"subject": (values["subject"],), "message-id": (values["message_id"] or "",)}
    headers.update(extra_headers)
    values["headers"] = headers
    return ParsedMessage(**values)


def reply_config(**overrides: Any) -> ReplyConfig:
    values: dict[str, Any] = {
        "from_address": "me@example.net",
        "own_addresses": ("me@example.net", "me.alias@example.net"),
    }
    values.update(overrides)
    return ReplyConfig(**values)
