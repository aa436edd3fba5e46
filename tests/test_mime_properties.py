"""Property tests: generated messages go through parse, store and search (SQLite and PostgreSQL).

Hypothesis builds messages with random header sets and values (RFC 2047 words in many charsets,
raw 8-bit, unknown charsets, folding, duplicates, missing headers) over random MIME trees (nested
multiparts, every transfer encoding, broken base64, unknown charsets, attachments with encoded
names). Each subject holds one marker word among random words. For every message: the parser
never gives up (no ``parser-error``), the subject's marker survives decoding, the message is
stored once (a second insert of the same UID adds nothing), and searching the marker finds it.

500 examples per backend in the default run; 10,000 under ``-m long`` (hypothesis profiles).
"""

from __future__ import annotations

import base64
import itertools
import quopri
import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from emailops.mime.parse import parse_message
from emailops.search.service import SearchOptions, search
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.content import message_content
from emailops.store.database import reading
from tests.index_helpers import index_engine, rows

ACCOUNT = "props@example.test"
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
# No example database (nothing written into the worktree) and no deadline: the machine running
# the suite may be busy, and slow parses are measured, not failed, here.
_COMMON = {"database": None, "deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("emailops-ci", max_examples=500, **_COMMON)
settings.register_profile("emailops-long", max_examples=10_000, **_COMMON)

# Charsets of encoded words and parts; "x-unknown-8bit" is one no codec knows.
CHARSETS = ("utf-8", "iso-8859-1", "windows-1252", "koi8-r", "shift_jis", "gb2312", "iso-2022-jp", "utf-16")
UNKNOWN_CHARSET = "x-unknown-8bit"

words = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"], exclude_characters="\r\n"),
    min_size=1,
    max_size=12,
)
markers = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=8, max_size=12).map(lambda w: "zq" + w)


def _encodable(text: str, charset: str) -> bool:
    try:
        text.encode(charset)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


@st.composite
def header_text(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as a header value: raw UTF-8, or RFC 2047 words (B or Q, in some charset, whole or
    split into several adjacent words), folded only at spaces."""
    how = draw(st.sampled_from(("raw", "encoded", "split")))
    if how == "raw" or not text:
        value = text.encode("utf-8")
    else:
        charset = draw(st.sampled_from([c for c in CHARSETS if c != "utf-16" and _encodable(text, c)]))
        pieces = [text]
        if how == "split" and len(text) > 2:
            cut = draw(st.integers(1, len(text) - 1))
            pieces = [text[:cut], text[cut:]]
        encoded = []
        for piece in pieces:
            data = piece.encode(charset)
            if draw(st.booleans()):
                encoded.append(f"=?{charset}?B?{base64.b64encode(data).decode()}?=")
            else:
                q = quopri.encodestring(data, header=True).decode("ascii").replace("=\n", "")
                q = q.replace("?", "=3F").replace("\t", "=09").replace(" ", "_")
                encoded.append(f"=?{charset}?Q?{q}?=")
        # Adjacent encoded words are joined by their decoder; the whitespace between them is not text.
        value = " ".join(encoded).encode("ascii")
    if b" " in value and draw(st.booleans()):
        value = value.replace(b" ", b"\r\n ", 1)  # folded
    return value


@st.composite
def subjects(draw: st.DrawFn) -> tuple[str, bytes]:
    marker = draw(markers)
    before = draw(st.lists(words, max_size=3))
    after = draw(st.lists(words, max_size=3))
    text = " ".join([*before, marker, *after])
    return marker, draw(header_text(text))


@st.composite
def other_headers(draw: st.DrawFn) -> list[bytes]:
    names = st.sampled_from(
        ("From", "To", "Cc", "Reply-To", "Date", "Message-ID", "In-Reply-To", "References", "List-Id",
         "Auto-Submitted", "Content-Language", "X-Mailer", "X-Priority", "Received")
    ) | st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z")  # fmt: skip
    values = (
        words.flatmap(header_text)
        | st.sampled_from(
            (b"Ann <ann@example.org>", b"=?utf-8?Q?J=C3=B6rg?= <j@example.org>", b"<a@b>", b"not an address",
             b"Mon, 06 May 2024 09:00:00 +0200", b"yesterday", b"<x@y> <z@w>", b"", b"=?bogus?Q?x?=",
             b"\xff\xfe broken 8-bit", b"<id@" + b"a" * 300 + b">")
        )
    )  # fmt: skip
    fields = draw(st.lists(st.tuples(names, values), max_size=12))
    return [name.encode() + b": " + value for name, value in fields]


def _transfer(body: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.encodebytes(body)
    if encoding == "quoted-printable":
        return quopri.encodestring(body)
    if encoding == "broken-base64":
        return base64.encodebytes(body)[:-3] + b"!!*\r\n"
    return body


@st.composite
def leaves(draw: st.DrawFn) -> bytes:
    content_type = draw(
        st.sampled_from(
            ("text/plain", "text/html", "application/octet-stream", "image/png", "text/x-unknown")
        )
    )
    charset = draw(st.sampled_from((*CHARSETS, UNKNOWN_CHARSET)))
    text = draw(st.text(max_size=200))
    body = text.encode(charset if _encodable(text, charset) else "utf-8")
    if content_type == "text/html":
        body = b"<html><body><p>" + body + b"</p></body></html>"
    encoding = draw(st.sampled_from(("7bit", "8bit", "base64", "quoted-printable", "broken-base64")))
    headers = [
        f"Content-Type: {content_type}; charset={charset}".encode(),
        f"Content-Transfer-Encoding: {'base64' if encoding == 'broken-base64' else encoding}".encode(),
    ]
    if draw(st.booleans()):
        name = draw(words)
        if draw(st.booleans()):
            headers.append(
                b"Content-Disposition: attachment; filename*=utf-8''" + name.encode().hex().encode()
            )
        else:
            headers.append(b'Content-Disposition: attachment; filename="' + draw(header_text(name)) + b'"')
    return b"\r\n".join(headers) + b"\r\n\r\n" + _transfer(body, encoding)


def _multipart(children: list[bytes], subtype: str, boundary: str) -> bytes:
    parts = b"".join(b"--" + boundary.encode() + b"\r\n" + child + b"\r\n" for child in children)
    return (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\npreamble\r\n'.encode()
        + parts
        + b"--"
        + boundary.encode()
        + b"--\r\nepilogue\r\n"
    )


def multiparts(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        _multipart,
        st.lists(children, min_size=1, max_size=4),
        st.sampled_from(("mixed", "alternative", "related", "x-unknown")),
        st.from_regex(r"\A[A-Za-z0-9'()+_,./:=?-]{1,40}\Z"),
    )


mime_trees = st.recursive(leaves(), multiparts, max_leaves=8)


@st.composite
def generated_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    marker, subject = draw(subjects())
    headers = draw(other_headers())
    headers.insert(draw(st.integers(0, len(headers))), b"Subject: " + subject)
    tree = draw(mime_trees)
    if draw(st.booleans()):
        tree = tree.replace(b"\r\n", b"\n")  # bare LF line ends, as some stores keep them
    return marker, b"\r\n".join(headers) + b"\r\nMIME-Version: 1.0\r\n" + tree


class PropertyRun:
    """Parses, stores and searches one generated message at a time, into one index."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            self.folder_id = folder_store.ensure_folder(conn, ACCOUNT, "INBOX").id
        self.uids = itertools.count(1)
        self.examples = 0
        self.slowest = (0.0, b"")
        # Hypothesis draws the same marker more than once: a search finds every message holding it.
        self.by_marker: dict[str, set[int]] = {}

    def check(self, marker: str, raw: bytes) -> None:
        started = time.perf_counter()
        parsed = parse_message(raw)
        seconds = time.perf_counter() - started
        if seconds > self.slowest[0]:
            self.slowest = (seconds, raw)
        assert not any(problem.startswith("parser-error") for problem in parsed.problems), parsed.problems
        assert marker in parsed.subject, (parsed.subject, parsed.problems)
        assert parsed.size == len(raw)

        uid = next(self.uids)
        item = message_store.FetchedMessage(uid, (), NOW, None, message_content(parsed))
        with self.engine.begin() as conn:
            first = message_store.insert_messages(
                conn, self.folder_id, 1, [item], baseline_uidnext=1, now=NOW
            )
            again = message_store.insert_messages(
                conn, self.folder_id, 1, [item], baseline_uidnext=1, now=NOW
            )
        assert list(first) == [uid] and again == {}
        expected = self.by_marker.setdefault(marker, set())
        expected.add(first[uid])
        with reading(self.engine) as conn:
            hits = search(conn, ACCOUNT, marker, SearchOptions(limit=len(expected) + 10))
        assert {hit.message_pk for hit in hits} == expected
        self.examples += 1


def run_properties(engine: Engine, profile: str) -> PropertyRun:
    run = PropertyRun(engine)

    @settings(settings.get_profile(profile))
    @given(generated_messages())
    def parse_store_search(message: tuple[str, bytes]) -> None:
        run.check(*message)

    parse_store_search()
    stored = rows(engine, "SELECT count(*), count(DISTINCT uid) FROM messages")
    # Hypothesis may replay an example (shrinking, its final run): every run stored a new UID once.
    assert stored == [(run.examples, run.examples)]
    seconds, raw = run.slowest
    print(f"{run.examples} generated messages; slowest parse {seconds * 1000:.1f} ms ({len(raw)} bytes)")
    return run


def test_generated_messages_parse_store_and_are_found(db_url: str) -> None:
    engine = index_engine(db_url)
    try:
        run = run_properties(engine, "emailops-ci")
    finally:
        engine.dispose()
    assert run.examples >= 500


@pytest.mark.long
@pytest.mark.timeout(3600)  # about 5 min per backend
def test_ten_thousand_generated_messages(db_url: str) -> None:
    engine = index_engine(db_url)
    try:
        run = run_properties(engine, "emailops-long")
    finally:
        engine.dispose()
    assert run.examples >= 10_000
