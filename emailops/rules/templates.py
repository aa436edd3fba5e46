"""Reply templates: ``str.format``-like placeholders, checked when the rules are loaded.

A template is parsed once with ``string.Formatter().parse`` and rendered by concatenating its
literal pieces and the named values. It is never passed to ``str.format``: there is no attribute or
index access (``{a.b}``, ``{a[0]}``), no conversion (``{a!r}``) and no format spec (``{a:>9}``),
so a template cannot reach any object or make the renderer do unbounded work. ``{{`` and ``}}``
are literal braces. An unknown placeholder is a ``TemplateError`` at load time, not at send time.
"""

from __future__ import annotations

import html
import string
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import format_datetime

from emailops.mime.model import ParsedMessage

# The values a template may use (see ``template_values``).
PLACEHOLDERS: dict[str, str] = {
    "sender_name": "the sender's display name, or their address when there is none",
    "sender": "the sender's address (the From address)",
    "subject": "the inbound message's subject",
    "date": "the inbound message's Date, RFC 5322 format (empty when absent)",
    "message_id": "the inbound Message-ID (empty when absent)",
    "to": "the first To address of the inbound message",
    "folder": "the folder the message arrived in",
    "rule": "the rule's name",
    "my_address": "the address replies are sent from",
}


# Only in a rule's ``llm_prompt``: what the model is asked to answer.
LLM_PLACEHOLDERS: dict[str, str] = {
    "body": "the inbound message's text, cut to LLM_MAX_INPUT_CHARS characters",
}


class TemplateError(ValueError):
    """The template text is malformed or uses a placeholder that does not exist."""


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and placeholder names, alternating."""

    source: str
    pieces: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, source: str, *, extra: Mapping[str, str] | None = None) -> Template:
        """``extra``: placeholders allowed here beyond ``PLACEHOLDERS`` (``LLM_PLACEHOLDERS``)."""
        known = {**PLACEHOLDERS, **(extra or {})}
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise TemplateError(
                f"malformed template ({exc}; write {{{{ and }}}} for literal braces)"
            ) from None
        pieces: list[tuple[str, str | None]] = []
        for literal, field_name, format_spec, conversion in parsed:
            if field_name is None:
                pieces.append((literal, None))
                continue
            shown = "{" + field_name + (f"!{conversion}" if conversion else "")
            shown += (f":{format_spec}" if format_spec else "") + "}"
            if not field_name or field_name.isdigit():
                raise TemplateError(f"placeholder {shown} has no name; use one of {_known(known)}")
            if not field_name.isidentifier():
                raise TemplateError(f"placeholder {shown}: attribute and index access are not allowed")
            if conversion or format_spec:
                raise TemplateError(f"placeholder {shown}: conversions and format specs are not allowed")
            if field_name not in known:
                raise TemplateError(f"unknown placeholder {shown}; known: {_known(known)}")
            pieces.append((literal, field_name))
        return cls(source=source, pieces=tuple(pieces))

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(name for _, name in self.pieces if name is not None)

    def render(self, values: Mapping[str, str], *, escape_html: bool = False) -> str:
        out: list[str] = []
        for literal, name in self.pieces:
            out.append(literal)
            if name is not None:
                value = values.get(name, "")
                out.append(html.escape(value) if escape_html else value)
        return "".join(out)


def _known(known: Mapping[str, str]) -> str:
    return ", ".join("{" + name + "}" for name in known)


def template_values(parsed: ParsedMessage, *, folder: str, rule: str, my_address: str) -> dict[str, str]:
    """The placeholder values for one inbound message (header values are already single-line)."""
    sender = parsed.sender
    sender_email = sender.email if sender else ""
    return {
        "sender_name": (sender.name or sender.email) if sender else "",
        "sender": sender_email,
        "subject": parsed.subject,
        "date": format_datetime(parsed.date) if parsed.date else "",
        "message_id": parsed.message_id or "",
        "to": parsed.to[0].email if parsed.to else "",
        "folder": folder,
        "rule": rule,
        "my_address": my_address,
    }
