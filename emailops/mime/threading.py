"""The thread key: one string shared by the messages of a conversation.

Rule, in order of preference:

1. the first Message-ID of ``References`` (the thread's root, as RFC 5322 replies keep it first);
2. else ``In-Reply-To`` (the parent, for replies from mailers that drop References);
3. else the message's own ``Message-ID`` (a thread root: its replies will name it in 1 or 2);
4. else ``"subject:"`` and the first 24 hex digits of the SHA-256 of the normalised subject.

Ids are the normalised ``<...>`` tokens, so key kinds 1-3 agree across a thread and never collide
with kind 4. The normalised subject is lower-cased, whitespace-collapsed, with any run of reply and
forward prefixes removed (``Re:``, ``Fwd:``, ``Fw:``, ``AW:``, ``WG:``, ``SV:``, ``VS:``, ``TR:``,
``Antw:``, also ``Re[2]:``), also after one leading ``[list tag]``.
"""

from __future__ import annotations

import hashlib
import re

_PREFIX_RE = re.compile(
    r"^(?:(?:re|fwd?|aw|wg|sv|vs|tr|antw)(?:\s*[\[(]\d{1,4}[\])])?\s*:\s*)+", re.IGNORECASE
)
_LIST_TAG_RE = re.compile(r"^\[[^\[\]]{1,64}\]\s*")


def normalise_subject(subject: str) -> str:
    text = " ".join(subject.split()).lower()
    text = _PREFIX_RE.sub("", text)
    tag = _LIST_TAG_RE.match(text)
    if tag:
        text = tag.group(0).rstrip() + " " + _PREFIX_RE.sub("", text[tag.end() :])
    return text.strip()


def thread_key(
    message_id: str | None, in_reply_to: str | None, references: tuple[str, ...], subject: str
) -> str:
    if references:
        return references[0]
    if in_reply_to:
        return in_reply_to
    if message_id:
        return message_id
    digest = hashlib.sha256(normalise_subject(subject).encode("utf-8", "surrogatepass")).hexdigest()
    return "subject:" + digest[:24]
