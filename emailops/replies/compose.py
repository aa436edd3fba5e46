"""Build the automatic reply to one inbound message.

Where the reply goes (RFC 3834 section 4). The RFC's default target for an automatic response is
the Return-Path (the SMTP reverse-path), because that is where a message's *transport* problems
belong. Our replies are "personal responses" meant to be read by the human who wrote the message
(acknowledgements, out-of-office), for which section 4 allows the address in Reply-To, or From when
there is no Reply-To. We therefore send to:

1. the Reply-To address, when Reply-To names exactly one address;
2. otherwise the (first) From address.

The Return-Path is not used as the target - it is often a VERP or bounce address of a mailing
system (``bounces+123@...``) that no human reads - but it is used as a *signal*: an empty
Return-Path (``<>``) marks a bounce or another automatic message, and ``robots`` suppresses the
reply. Sender is never used (RFC 3834 section 4: it names the agent, not the author).

Safety. Every value taken from the inbound message is reduced to one line (CR, LF, NUL and other
control characters become spaces) before it reaches a header; the recipient must be exactly one
plain addr-spec (ASCII dot-atom local part ``@`` domain), otherwise there is no reply; message ids
copied into In-Reply-To/References must look like ``<left@right>`` with no space. The message is
built with ``email.message.EmailMessage`` and ``email.policy.SMTP``, which encodes non-ASCII text
(RFC 2047) and folds long lines itself, so no inbound text can add or split a header.

The reply's Message-ID is derived from the inbound key and the rule name, so composing the same
reply twice gives the same Message-ID (the outbox is unique on the same pair).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.headerregistry import Address as HeaderAddress
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime

from emailops.mime.addresses import parse_addresses
from emailops.mime.model import Address, ParsedMessage

# References keeps the first id of the thread and the most recent ones (RFC 5322 section 3.6.4).
MAX_REFERENCES = 20
MAX_SUBJECT_CHARS = 998 - len("Subject: ")
# Prefix of our own Message-IDs; robots recognises our replies by it and by our domain.
MESSAGE_ID_PREFIX = "autoreply."

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_MSG_ID = re.compile(r"<[!-;=?-~]{1,900}@[!-;=?-~]{1,250}>")
_REPLY_PREFIX = re.compile(r"^\s*(re|aw|sv|antw|r)\s*(\[\d+\])?\s*:", re.IGNORECASE)


class _HeaderClassPerKind(HeaderRegistry):
    """The stdlib registry, making the class of each kind of header once instead of per header.

    ``HeaderRegistry.__getitem__`` creates a new class (``type(...)``) for every header it builds,
    about 25 per reply. Classes live in reference cycles, so only the garbage collector frees them,
    and many survive into the oldest generation, which it collects rarely: they piled up between
    full collections, the largest growing allocation site of a worker answering mail (issue 14).
    The class depends only on the header's kind (a fixed, small set), never on its name or value.
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[type, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._classes.get(kind)
        if made is None:
            made = self._classes[kind] = type("_" + kind.__name__, (kind, self.base_class), {})
        return made


_POLICY = policy.SMTP.clone(header_factory=_HeaderClassPerKind())


class AddressError(ValueError):
    """An address is not exactly one plain addr-spec; no reply is sent to it."""


@dataclass(frozen=True)
class ComposedReply:
    recipient: str
    message_id: str
    subject: str
    raw: bytes


def _decode_encoded_words(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, ValueError, UnicodeError):
        return value


def one_line(value: str) -> str:
    """``value`` on one line, safe to put into a header of the reply.

    Control characters (CR, LF, NUL, ...) become spaces. RFC 2047 encoded-words are decoded first
    (repeatedly) and the result cleaned again: ``email.headerregistry`` would otherwise decode
    ``=?utf-8?q?a=0D=0ABcc:...?=`` *after* our cleaning and emit a real line break. Whatever is
    still shaped like an encoded-word (malformed ones) is broken up so nothing decodes it later.
    """
    cleaned = _CONTROL.sub(" ", value)
    for _ in range(3):
        if "=?" not in cleaned:
            break
        decoded = _CONTROL.sub(" ", _decode_encoded_words(cleaned))
        if decoded == cleaned:
            break
        cleaned = decoded
    return cleaned.replace("=?", "= ?").strip()


def validate_addr_spec(value: str) -> str:
    """Return ``value`` if it is exactly one ``local@domain`` addr-spec (ASCII, <= 254 chars)."""
    if not isinstance(value, str) or value != value.strip() or len(value) > 254:
        raise AddressError(f"not a single address: {value!r}")
    local, at, domain = value.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local) or len(local) > 64 or not _DOMAIN.fullmatch(domain):
        raise AddressError(f"not a single plain address: {value!r}")
    return value


def parse_from_address(value: str) -> HeaderAddress:
    """The configured sender (``addr`` or ``Name <addr>``) as one header address."""
    parsed = parse_addresses(value.encode("utf-8", "surrogateescape"), [])
    if len(parsed) != 1:
        raise AddressError(f"the From address must be exactly one address: {value!r}")
    name, addr = parsed[0].name, parsed[0].email
    validate_addr_spec(addr)
    local, _, domain = addr.rpartition("@")
    return HeaderAddress(display_name=one_line(name), username=local, domain=domain)


def choose_recipient(parsed: ParsedMessage) -> Address:
    """The one address the reply goes to: Reply-To when it names exactly one address, else From.

    Raises ``AddressError`` when that address is missing or not a single plain addr-spec.
    """
    if len(parsed.reply_to) == 1:
        chosen = parsed.reply_to[0]
    elif parsed.from_:
        chosen = parsed.from_[0]
    else:
        raise AddressError("the message has no From address")
    validate_addr_spec(chosen.email)
    return chosen


def reply_subject(original: str) -> str:
    """``Re: `` plus the original, unless it already starts with a reply prefix (no ``Re: Re:``)."""
    subject = one_line(original)
    if _REPLY_PREFIX.match(subject):
        return subject[:MAX_SUBJECT_CHARS]
    return ("Re: " + subject if subject else "Re:")[:MAX_SUBJECT_CHARS]


def reply_message_id(inbound_key: str, rule_name: str, from_domain: str) -> str:
    digest = hashlib.sha256(f"{inbound_key}\0{rule_name}".encode()).hexdigest()[:32]
    return f"<{MESSAGE_ID_PREFIX}{digest}@{from_domain}>"


def clean_message_id(value: str | None) -> str | None:
    """``value`` as ``<left@right>`` if it is a well-formed message id, else ``None``."""
    if not value:
        return None
    candidate = value.strip()
    if "=?" in candidate:
        return None
    if not candidate.startswith("<"):
        candidate = f"<{candidate}>"
    return candidate if _MSG_ID.fullmatch(candidate) else None


def references_for(parsed: ParsedMessage) -> list[str]:
    """The reply's References: the inbound References (bounded) then the inbound Message-ID."""
    refs = [r for r in (clean_message_id(x) for x in parsed.references) if r]
    own = clean_message_id(parsed.message_id)
    if own:
        refs = [r for r in refs if r != own]
        refs.append(own)
    if len(refs) > MAX_REFERENCES:
        refs = [refs[0], *refs[-(MAX_REFERENCES - 1) :]]
    return refs


def _transfer_encoding(text: str) -> str:
    # Never 8bit: a relay without 8BITMIME could mangle it; quoted-printable keeps text readable.
    return (
        "7bit"
        if text.isascii() and all(len(line) <= 998 for line in text.splitlines())
        else "quoted-printable"
    )


def build_reply(
    parsed: ParsedMessage,
    *,
    from_address: str,
    inbound_key: str,
    rule_name: str,
    body_text: str,
    html_text: str | None = None,
    subject: str | None = None,
    now: datetime,
) -> ComposedReply:
    """The reply as bytes ready for SMTP (CRLF line ends). ``subject`` overrides ``Re: ...``.

    Raises ``AddressError`` when there is no single valid recipient or From address.
    """
    sender = parse_from_address(from_address)
    recipient = choose_recipient(parsed)
    final_subject = one_line(subject)[:MAX_SUBJECT_CHARS] if subject else reply_subject(parsed.subject)
    message_id = reply_message_id(inbound_key, rule_name, sender.domain)

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = sender
    local, _, domain = recipient.email.rpartition("@")
    msg["To"] = HeaderAddress(display_name=one_line(recipient.name), username=local, domain=domain)
    msg["Subject"] = final_subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    in_reply_to = clean_message_id(parsed.message_id)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    refs = references_for(parsed)
    if refs:
        msg["References"] = " ".join(refs)
    msg["Auto-Submitted"] = "auto-replied"
    # Asks Exchange and similar responders not to answer our answer (a loop guard on their side).
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(body_text, charset="utf-8", cte=_transfer_encoding(body_text))
    if html_text is not None:
        msg.add_alternative(html_text, subtype="html", charset="utf-8", cte=_transfer_encoding(html_text))

    return ComposedReply(
        recipient=recipient.email.lower(),
        message_id=message_id,
        subject=final_subject,
        raw=msg.as_bytes(policy=_POLICY),
    )
