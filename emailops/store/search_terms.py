"""How text becomes search terms, the same for a message and for a query, on both backends.

Python splits and folds the text once; both databases then only see terms made of ``[a-z0-9]``
separated by spaces, which FTS5's ``ascii`` tokenizer and PostgreSQL's ``simple`` parser both keep
whole. That is what makes a query find the same messages on SQLite and PostgreSQL.

Matching rules (written down here, in README "Search" and checked by tests/test_search_properties):

- text is case-folded and accent-folded (NFKD, combining marks dropped, then NFC);
- a word is a run of letters or digits; anything else separates words; only a word's first
  ``MAX_WORD_CHARS`` characters count;
- Chinese, Japanese and Korean text has no spaces: a run of such characters is indexed as its
  overlapping pairs plus its last character, so any sub-run of two or more characters is found
  (as a phrase of pairs) and a single character is found where it starts a pair or ends a run;
- each term carries its field as a one-letter tag, so ``subject:x`` and free ``x`` are different
  terms; terms of different fields or different addresses are never adjacent (phrases stay inside);
- a message is indexed up to ``MAX_TERMS`` terms (PostgreSQL counts positions to 16,383) and
  ``MAX_DOCUMENT_CHARS`` characters of terms (a tsvector holds at most 1 MB).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

MAX_WORD_CHARS = 64
MAX_VALUE_CHARS = 256  # of a whole address, local part or domain compared by the address operators
MAX_TERMS = 15_000
MAX_DOCUMENT_CHARS = 400_000
# Between fields and between two addresses: a term no query ever asks for.
SEPARATOR = "zz"

_PLAIN = frozenset("abcdefghijklmnoprstuvwxyz0123456789")  # every letter but q, the escape


class Tag(StrEnum):
    """A term's field. Free words search SUBJECT, BODY and ADDRESS_WORDS."""

    SUBJECT = "s"
    BODY = "b"
    ADDRESS_WORDS = "w"  # every word of From, To, Cc and Reply-To, names and addresses
    ATTACHMENT = "a"  # words of attachment file names
    FROM_NAME = "f"
    TO_NAME = "t"
    CC_NAME = "c"
    FROM_ADDRESS = "g"  # whole address, local part and domain, one term each
    TO_ADDRESS = "u"
    CC_ADDRESS = "k"


FREE_TEXT_TAGS = (Tag.SUBJECT, Tag.BODY, Tag.ADDRESS_WORDS)


_CJK_RANGES = (
    "\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"  # Han
    "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"  # Hangul
)
# A CJK run, or a word: letters and digits (\w without "_") that are not CJK.
_TOKEN_RE = re.compile(f"([{_CJK_RANGES}]+)|([^\\W_{_CJK_RANGES}]+)")


def fold(text: str) -> str:
    """Case and accents folded: ``Crème`` and ``CREME`` fold alike."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    return unicodedata.normalize("NFC", stripped)


@dataclass(frozen=True)
class Token:
    """A word (its first ``MAX_WORD_CHARS`` characters) or a whole CJK run, folded."""

    text: str
    cjk: bool


def tokens(text: str) -> list[Token]:
    """The words and CJK runs of ``text``, folded, in order."""
    return [
        Token(cjk, True) if cjk else Token(word[:MAX_WORD_CHARS], False)
        for cjk, word in _TOKEN_RE.findall(fold(text))
    ]


def encode(word: str) -> str:
    """``word`` in ``[a-z0-9]``: a-z (but q) and digits as they are, any other character as ``q``
    and six hex digits. A per-character code without prefixes of one another, so a prefix of a
    word encodes to a prefix of the word's code (``prefix*`` works on codes)."""
    return "".join(c if c in _PLAIN else f"q{ord(c):06x}" for c in word)


def cjk_terms(run: str, *, ends_run: bool) -> list[str]:
    """The pairs of a CJK run, and its last character when the run ends there."""
    pairs = [run[i : i + 2] for i in range(len(run) - 1)]
    return [*pairs, run[-1]] if ends_run or len(run) == 1 else pairs


def token_terms(token: Token) -> list[str]:
    """The unencoded terms a document's token is indexed as."""
    return cjk_terms(token.text, ends_run=True) if token.cjk else [token.text]


class DocumentBuilder:
    """Collects a message's terms field by field, within the limits above."""

    def __init__(self) -> None:
        self._terms: list[str] = []
        self._chars = 0
        self._full = False

    def _add(self, term: str) -> None:
        if self._full:
            return
        if len(self._terms) >= MAX_TERMS or self._chars + len(term) + 1 > MAX_DOCUMENT_CHARS:
            self._full = True
            return
        self._terms.append(term)
        self._chars += len(term) + 1

    def separate(self) -> None:
        if self._terms and self._terms[-1] != SEPARATOR:
            self._add(SEPARATOR)

    def text(self, tag: Tag, text: str) -> None:
        for token in tokens(text):
            for term in token_terms(token):
                self._add(tag + encode(term))
            if self._full:
                return

    def exact(self, tag: Tag, values: Iterable[str]) -> None:
        for value in values:
            if value:
                self._add(tag + encode(fold(value)[:MAX_VALUE_CHARS]))

    def result(self) -> str:
        return " ".join(self._terms)


@dataclass(frozen=True)
class Mailbox:
    name: str
    email: str


def address_parts(email: str) -> tuple[str, ...]:
    """What an address operator compares whole: the address, its local part, its domain."""
    local, at, domain = email.rpartition("@")
    return (email, local, domain) if at else (email,)


def _addresses(
    builder: DocumentBuilder, name_tag: Tag, address_tag: Tag, mailboxes: Sequence[Mailbox]
) -> None:
    for mailbox in mailboxes:
        builder.separate()
        builder.text(name_tag, mailbox.name)
        builder.separate()
        builder.exact(address_tag, address_parts(mailbox.email))


def document_terms(
    *,
    subject: str,
    from_: Sequence[Mailbox],
    to: Sequence[Mailbox],
    cc: Sequence[Mailbox],
    reply_to: Sequence[Mailbox],
    attachment_names: Sequence[str],
    body: str,
) -> str:
    """The terms of one message, space-separated, as both backends index them."""
    builder = DocumentBuilder()
    builder.text(Tag.SUBJECT, subject)
    for mailbox in (*from_, *to, *cc, *reply_to):
        builder.separate()
        builder.text(Tag.ADDRESS_WORDS, f"{mailbox.name} {mailbox.email}")
    _addresses(builder, Tag.FROM_NAME, Tag.FROM_ADDRESS, from_)
    _addresses(builder, Tag.TO_NAME, Tag.TO_ADDRESS, to)
    _addresses(builder, Tag.CC_NAME, Tag.CC_ADDRESS, cc)
    for name in attachment_names:
        builder.separate()
        builder.text(Tag.ATTACHMENT, name)
    builder.separate()
    builder.text(Tag.BODY, body)
    return builder.result()
