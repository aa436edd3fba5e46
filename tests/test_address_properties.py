"""Property test: generated address lists survive parse -> store -> load (SQLite and PostgreSQL).

Hypothesis writes From, To, Cc and Reply-To values out of mailboxes whose addresses it knows:
quoted names holding commas, semicolons, quotes, backslashes and angle brackets; RFC 2047 names in
every charset the parser knows (B and Q, whole or split across words); plain phrases; comments (a
name of their own where there is no other, else ignored); source routes; internationalised and
punycode domains and domain literals; groups, empty ones (``undisclosed-recipients:;``) included;
folding. For every message: the parser gives exactly the generated addresses, its fast path and its
token path agree, ``str(Address)`` reads back as the same address, and the index (row written,
row read back as the rules read it) gives the same addresses again.

500 messages per backend, each with two to four address lists.
"""

from __future__ import annotations

import base64
import codecs
import encodings.aliases
import itertools
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from emailops.mime.addresses import address_list, parse_addresses
from emailops.mime.charsets import _CHARSET_ALIASES, lookup_charset
from emailops.mime.headers import header_text
from emailops.mime.model import Address, ParsedMessage
from emailops.mime.parse import parse_message
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.content import message_content
from tests.index_helpers import index_engine

ACCOUNT = "addresses@example.test"
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
EXAMPLES = 500

# Every label the parser decodes: Python's codec names and aliases, and the labels mail uses for
# a superset (gb2312 read as gb18030, ...). A name is encoded with the codec the label is read by.
CHARSETS = tuple(
    label
    for label in sorted({*encodings.aliases.aliases.values(), *_CHARSET_ALIASES})
    if lookup_charset(label) is not None
)

name_chars = st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"])


def _normal(text: str) -> str:
    return " ".join(text.split())


# A display name as a reader sees it: one line, single spaces, never shaped like an encoded word.
names = (
    st.text(alphabet=name_chars, min_size=1, max_size=24).map(_normal)
    | st.sampled_from(
        ("Doe, John", "Müller, Hans", 'O\'Brien; "Pat"', "back\\slash", "x <y@z>", "Team: all", "a.b")
    )
).filter(lambda name: bool(name) and "=?" not in name)
atext = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
atoms = st.text(alphabet=atext, min_size=1, max_size=10)
words = st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=10)
labels = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?\Z")
unicode_labels = st.text(alphabet=st.characters(categories=["Ll", "Lo"]), min_size=1, max_size=8)


@st.composite
def domains(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(("ascii", "idn", "punycode", "literal")))
    if kind == "literal":
        return "[" + ".".join(str(draw(st.integers(0, 255))) for _ in range(4)) + "]"
    tld = draw(st.sampled_from(("example", "test", "org", "de")))
    if kind == "ascii":
        return ".".join([*draw(st.lists(labels, min_size=1, max_size=3)), tld])
    label = draw(unicode_labels)
    if kind == "punycode":
        label = "xn--" + label.encode("punycode").decode("ascii")
    return f"{label}.{tld}"


@st.composite
def emails(draw: st.DrawFn) -> str:
    local = ".".join(draw(st.lists(atoms, min_size=1, max_size=3)))
    return f"{local}@{draw(domains())}"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def _q_encoded(data: bytes) -> str:
    safe = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/"
    return "".join("_" if b == 0x20 else chr(b) if b in safe else f"={b:02X}" for b in data)


@st.composite
def encoded_names(draw: st.DrawFn, name: str) -> str | None:
    """``name`` as RFC 2047 words in a charset that can write it, or ``None`` if none can."""
    fitting = []
    for label in CHARSETS:
        codec = lookup_charset(label)
        assert codec is not None
        try:
            if codecs.decode(codecs.encode(name, codec), codec) == name:
                fitting.append((label, codec))
        except (UnicodeError, LookupError):
            continue
    if not fitting:
        return None
    label, codec = draw(st.sampled_from(fitting))
    data = codecs.encode(name, codec)
    cuts = (
        sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=2))))
        if len(data) > 1
        else []
    )
    pieces = [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]
    encoded = []
    for piece in pieces:
        if draw(st.booleans()):
            encoded.append(f"=?{label}?B?{base64.b64encode(piece).decode()}?=")
        else:
            encoded.append(f"=?{label}?Q?{_q_encoded(piece)}?=")
    return " ".join(encoded)


@st.composite
def mailboxes(draw: st.DrawFn) -> tuple[str, Address]:
    """A mailbox as written, and the address it is."""
    email = draw(emails())
    form = draw(st.sampled_from(("bare", "commented", "quoted", "phrase", "encoded")))
    if form == "bare":
        return email, Address("", email)
    if form == "commented":  # the old convention: a comment is the name of a bare address
        name = draw(names)
        return f"{email} {_comment(name)}", Address(name, email)
    if form == "phrase":
        name = " ".join(draw(st.lists(words, min_size=1, max_size=3)))
        written = name
    else:
        name = draw(names)
        encoded = draw(encoded_names(name)) if form == "encoded" else None
        written = encoded if encoded is not None else _quoted(name)
    angle = email
    if draw(st.booleans()):
        angle = ",".join("@" + draw(domains()) for _ in range(draw(st.integers(1, 2)))) + ":" + email
    # Comments next to a display name are not part of it.
    before = _comment(draw(names)) + " " if draw(st.integers(0, 4)) == 0 else ""
    after = " " + _comment(draw(names)) if draw(st.integers(0, 4)) == 0 else ""
    return f"{before}{written} <{angle}>{after}", Address(name, email)


@st.composite
def address_lists(draw: st.DrawFn) -> tuple[bytes, tuple[Address, ...]]:
    """An address-list header value and its addresses in order (group members in place)."""
    parts: list[str] = []
    expected: list[Address] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("mailbox", "mailbox", "group", "empty group")))
        if kind == "empty group":
            parts.append(draw(st.sampled_from(("undisclosed-recipients:;", '"Sales, EMEA": ;'))))
            continue
        if kind == "mailbox":
            written, address = draw(mailboxes())
            parts.append(written)
            expected.append(address)
            continue
        members = draw(st.lists(mailboxes(), min_size=1, max_size=3))
        label = draw(st.sampled_from(("Team", '"Sales, EMEA"', "friends (and family)")))
        parts.append(f"{label}: " + ", ".join(written for written, _ in members) + ";")
        expected += [address for _, address in members]
    value = draw(st.sampled_from((", ", ",", " , "))).join(parts)
    if " " in value and draw(st.booleans()):
        value = value.replace(" ", "\r\n ", 1)  # folded
    return value.encode("utf-8"), tuple(expected)


FIELDS = (("From", "from_"), ("To", "to"), ("Cc", "cc"), ("Reply-To", "reply_to"))


@st.composite
def messages_with_addresses(draw: st.DrawFn) -> tuple[bytes, dict[str, tuple[Address, ...]]]:
    present = [FIELDS[0], FIELDS[1], *(f for f in FIELDS[2:] if draw(st.booleans()))]
    lines: list[bytes] = []
    expected: dict[str, tuple[Address, ...]] = {attribute: () for _, attribute in FIELDS}
    for header, attribute in present:
        value, addresses = draw(address_lists())
        lines.append(header.encode() + b": " + value)
        expected[attribute] = addresses
    lines += [b"Subject: addresses", b"Message-ID: <m@example.test>", b"Date: Tue, 2 Jan 2024 10:00:00 +0000"]
    return b"\r\n".join(lines) + b"\r\n\r\nbody\r\n", expected


def addresses_of(parsed: ParsedMessage) -> dict[str, tuple[Address, ...]]:
    return {attribute: getattr(parsed, attribute) for _, attribute in FIELDS}


class AddressRun:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            self.folder_id = folder_store.ensure_folder(conn, ACCOUNT, "INBOX").id
        self.uids = itertools.count(1)
        self.lists = 0

    def check(self, raw: bytes, expected: dict[str, tuple[Address, ...]]) -> None:
        parsed = parse_message(raw)
        assert addresses_of(parsed) == expected, raw
        for line in raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").split(b"\r\n"):
            name, _, value = line.partition(b": ")
            if name in (b"From", b"To", b"Cc", b"Reply-To"):
                self.lists += 1
                by_tokens = address_list(header_text(value, []), [])
                assert parse_addresses(value, []) == by_tokens, value
        for found in expected.values():
            written = ", ".join(str(address) for address in found).encode("utf-8")
            assert parse_addresses(written, []) == found, written

        uid = next(self.uids)
        item = message_store.FetchedMessage(uid, (), NOW, None, message_content(parsed))
        with self.engine.begin() as conn:
            pk = message_store.insert_messages(conn, self.folder_id, 1, [item], baseline_uidnext=1, now=NOW)[
                uid
            ]
            stored = message_store.load_message(conn, pk)
        assert stored is not None
        assert addresses_of(stored.parsed) == expected, raw


def test_generated_address_lists_survive_parse_store_and_load(db_url: str) -> None:
    engine = index_engine(db_url)
    run = AddressRun(engine)

    @settings(
        max_examples=EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(messages_with_addresses())
    def parse_store_load(message: tuple[bytes, dict[str, tuple[Address, ...]]]) -> None:
        run.check(*message)

    try:
        parse_store_load()
    finally:
        engine.dispose()
    print(f"{run.lists} generated address lists")
    assert run.lists >= EXAMPLES
