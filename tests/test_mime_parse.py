"""parse_message: the fields the index, the search and the reply rules rely on."""

from __future__ import annotations

import base64
import codecs
import random
import time
from datetime import UTC, datetime, timedelta, timezone

from emailops.mime.model import Address, Attachment
from emailops.mime.parse import parse_message
from emailops.mime.threading import normalise_subject, thread_key

SIMPLE = (
    b"Return-Path: <bounces@lists.example.org>\r\n"
    b"From: =?utf-8?q?Ren=C3=A9e?= Doe <renee@example.org>\r\n"
    b'To: "Doe, John" <john@example.net>, jane@example.net\r\n'
    b"Cc: Team <team@example.com>\r\n"
    b"Reply-To: replies@example.org\r\n"
    b"Subject: =?iso-8859-1?q?Gr=FC=DFe?= aus\r\n  Berlin\r\n"
    b"Date: Tue, 3 Mar 2026 10:15:00 +0100\r\n"
    b"Message-ID: <abc@example.org>\r\n"
    b"In-Reply-To: <parent@example.org> (comment)\r\n"
    b"References: <root@example.org>\r\n <parent@example.org>\r\n"
    b"List-Id: Example list <list.example.org>\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"X-Custom: one\r\n"
    b"X-Custom: two\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello R\xc3\xa9e, plain body.\r\n"
)


def _multipart(*parts: bytes, subtype: bytes = b"mixed", headers: bytes = b"") -> bytes:
    body = b"".join(b"--sep\r\n" + part + b"\r\n" for part in parts) + b"--sep--\r\n"
    return (
        b"From: a@example.org\r\nSubject: multipart\r\n"
        + headers
        + b"Content-Type: multipart/"
        + subtype
        + b'; boundary="sep"\r\n\r\npreamble\r\n'
        + body
    )


def test_simple_message_fields() -> None:
    parsed = parse_message(SIMPLE)
    assert parsed.subject == "Grüße aus Berlin"
    assert parsed.from_ == (Address("Renée Doe", "renee@example.org"),)
    assert parsed.sender == Address("Renée Doe", "renee@example.org")
    assert parsed.to == (Address("Doe, John", "john@example.net"), Address("", "jane@example.net"))
    assert parsed.cc == (Address("Team", "team@example.com"),)
    assert parsed.reply_to == (Address("", "replies@example.org"),)
    assert parsed.date == datetime(2026, 3, 3, 9, 15, tzinfo=UTC)
    assert parsed.date.utcoffset() == timedelta(hours=1)
    assert parsed.message_id == "<abc@example.org>"
    assert parsed.in_reply_to == "<parent@example.org>"
    assert parsed.references == ("<root@example.org>", "<parent@example.org>")
    assert parsed.list_id == "Example list <list.example.org>"
    assert parsed.auto_submitted == "auto-replied"
    assert parsed.return_path == "bounces@lists.example.org"
    assert parsed.headers["x-custom"] == ("one", "two")
    assert parsed.header("X-CUSTOM") == "one"
    assert parsed.header("missing") is None
    assert parsed.body_text == "Hello Rée, plain body.\n"
    assert parsed.attachments == ()
    assert parsed.size == len(SIMPLE)
    assert parsed.thread_key == "<root@example.org>"
    assert not parsed.truncated
    assert parsed.problems == ()


def test_null_return_path_and_absent_return_path() -> None:
    assert parse_message(b"Return-Path: <>\r\nSubject: x\r\n\r\nbody").return_path == ""
    assert parse_message(b"Subject: x\r\n\r\nbody").return_path is None


def test_date_without_zone_is_utc_and_garbage_is_none() -> None:
    parsed = parse_message(b"Date: Tue, 3 Mar 2026 10:15:00\r\n\r\n")
    assert parsed.date == datetime(2026, 3, 3, 10, 15, tzinfo=UTC)
    parsed = parse_message(b"Date: Tue, 3 Mar 2026 10:15:00 -0430\r\n\r\n")
    assert parsed.date.tzinfo == timezone(timedelta(hours=-4, minutes=-30))
    parsed = parse_message(b"Date: the day after tomorrow\r\n\r\n")
    assert parsed.date is None
    assert "date-invalid" in parsed.problems
    assert parse_message(b"Date: Tue, 3 Mar 99999 10:15:00 +0000\r\n\r\n").date is None


def test_message_ids_are_normalised_to_angle_tokens() -> None:
    parsed = parse_message(
        b"Message-ID: bare-id@example.org\r\n"
        b"In-Reply-To: <a@x> <b@x>\r\n"
        b"References: junk <r1@x>junk<r2@x>\r\n\r\n"
    )
    assert parsed.message_id == "<bare-id@example.org>"
    assert parsed.in_reply_to == "<a@x>"
    assert parsed.references == ("<r1@x>", "<r2@x>")


def test_thread_key_rules() -> None:
    assert thread_key("<m>", "<p>", ("<r>", "<p>"), "s") == "<r>"
    assert thread_key("<m>", "<p>", (), "s") == "<p>"
    assert thread_key("<m>", None, (), "s") == "<m>"
    by_subject = thread_key(None, None, (), "Re: AW: Fwd: Quarterly  Report")
    assert by_subject.startswith("subject:")
    assert by_subject == thread_key(None, None, (), "quarterly report")
    assert thread_key(None, None, (), "[list] Re: topic") == thread_key(None, None, (), "[list] topic")
    assert normalise_subject("SV: Re[2]: WG: Hello") == "hello"
    assert normalise_subject("Regarding: x") == "regarding: x"


def test_plain_parts_are_concatenated_and_attachments_listed() -> None:
    raw = _multipart(
        b"Content-Type: text/plain\r\n\r\nfirst part",
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"second part caf=E9",
        b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="notes.txt"\r\n\r\nnot body',
        b"Content-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"GIF89a" + bytes(100)),
        b"Content-Type: text/html\r\n\r\n<p>html alternative not used</p>",
    )
    parsed = parse_message(raw)
    assert parsed.body_text == "first part\n\nsecond part café"
    assert parsed.attachments == (
        Attachment("notes.txt", "text/plain", len(b"not body")),
        Attachment(None, "image/gif", 106),
    )
    assert parsed.problems == ("header-missing:date", "header-missing:message-id")


def test_html_is_used_only_without_plain_text() -> None:
    raw = _multipart(
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes("<p>B\u00fcro <i>owl</i></p><script>hidden()</script>".encode()),
        subtype=b"alternative",
    )
    assert parse_message(raw).body_text == "Büro owl"


def test_forwarded_message_text_is_indexed() -> None:
    inner = b"Subject: inner\r\nContent-Type: text/plain\r\n\r\nforwarded heron"
    raw = _multipart(
        b"Content-Type: text/plain\r\n\r\nsee below", b"Content-Type: message/rfc822\r\n\r\n" + inner
    )
    parsed = parse_message(raw)
    assert "see below" in parsed.body_text
    assert "forwarded heron" in parsed.body_text


def test_rfc2231_continuations_and_encoded_word_filenames() -> None:
    raw = _multipart(
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*0*=utf-8''%E2%82%AC%20;\r\n"
        b" filename*1=report.pdf\r\n\r\nxyz",
        b'Content-Type: application/zip; name="=?utf-8?b?w6Rw?=.zip"\r\n\r\nzz',
    )
    parsed = parse_message(raw)
    assert [a.filename for a in parsed.attachments] == ["€ report.pdf", "äp.zip"]


def test_body_chars_bound_truncates() -> None:
    raw = b"Subject: big\r\n\r\n" + b"word " * 10_000
    parsed = parse_message(raw, max_body_chars=1000)
    assert len(parsed.body_text) == 1000
    assert parsed.truncated
    assert "body-truncated" in parsed.problems


def test_message_over_the_byte_limit_keeps_headers_and_a_prefix() -> None:
    raw = b"Subject: huge\r\nFrom: a@b.example\r\n\r\n" + b"start marker " + b"x" * 100_000 + b" end marker"
    parsed = parse_message(raw, max_message_bytes=10_000)
    assert parsed.subject == "huge"
    assert parsed.truncated
    assert "message-truncated" in parsed.problems
    assert parsed.body_text.startswith("start marker")
    assert "end marker" not in parsed.body_text
    assert parsed.size == len(raw)


def test_encoded_words_cannot_forge_addresses() -> None:
    parsed = parse_message(b"From: =?utf-8?q?boss@bank.example,?= <attacker@evil.example>\r\n\r\n")
    assert parsed.from_ == (Address("boss@bank.example,", "attacker@evil.example"),)


def test_unusual_address_forms_fall_back_to_the_stdlib() -> None:
    parsed = parse_message(
        b"To: undisclosed-recipients:;\r\nCc: joe@example.org (Joe Bloggs), <x@y.example>\r\n\r\n"
    )
    assert parsed.to == ()
    assert parsed.cc == (Address("Joe Bloggs", "joe@example.org"), Address("", "x@y.example"))


def test_bare_lf_line_endings_and_malformed_header_line() -> None:
    parsed = parse_message(b"Subject: unix\nX-A: 1\n folded\nthis is not a header\nmore body\n")
    assert parsed.subject == "unix"
    assert parsed.headers["x-a"] == ("1 folded",)
    assert "header-malformed-line" in parsed.problems
    assert "this is not a header" in parsed.body_text


def test_no_input_makes_it_raise() -> None:
    for raw in (
        b"",
        b"\r\n",
        b"\x00" * 100,
        b":",
        b"--",
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
    ):
        parsed = parse_message(raw)
        assert parsed.size == len(raw)
    assert parse_message(bytearray(b"Subject: ba\r\n\r\nx")).subject == "ba"
    broken = parse_message(None)  # type: ignore[arg-type]
    assert broken.problems[0].startswith("parser-error:")


def test_mutated_messages_never_raise_and_stay_fast() -> None:
    seeds = [
        SIMPLE,
        _multipart(b"Content-Type: text/plain\r\n\r\nhello", b"Content-Type: image/png\r\n\r\nxx"),
    ]
    alphabet = b'\r\n\t :;=?"<>@,-_\x00\xff\xc3=?utf-8?q?b?x-foo--sep'
    generator = random.Random(1234)
    started = time.perf_counter()
    for _ in range(2000):
        raw = bytearray(generator.choice(seeds))
        for _ in range(generator.randint(1, 12)):
            position = generator.randrange(len(raw))
            if generator.random() < 0.5:
                raw[position] = generator.choice(alphabet)
            else:
                del raw[position : position + generator.randint(1, 8)]
        parsed = parse_message(bytes(raw))
        assert not any(p.startswith("parser-error") for p in parsed.problems), parsed.problems
        assert "\n" not in parsed.subject
    assert time.perf_counter() - started < 10


def test_header_splitting_fast_path_agrees_with_the_line_by_line_one() -> None:
    """``split_header_block`` takes a one-regex path for well-formed blocks: wherever it does, its
    answer must be the careful path's, and everything odd must fall through to the careful path."""
    from emailops.mime.header_block import _split_line_by_line, _split_well_formed
    from tests.corpus.hostile import hostile_corpus

    well_formed = (
        b"From: a@b\r\nSubject: hi\r\n  folded\r\nX-Empty:\r\nX-Spaced  : v\r\n\r\nbody",
        b"From: a@b\nTo: c@d\n\nbody\n\nmore",
        b"A: 1\nA: 2\n\n",
        b"Subject: x\r\r\nTo: y\n\nbody",  # a stray CR belongs to the value
    )
    odd = (
        b"From a@b Mon Jan  1 00:00:00 2024\nSubject: mbox\n\nbody",  # mbox separator
        b" orphan\nSubject: x\n\nbody",  # continuation before any field
        b"Subject: x\nnot a field\n\nbody",  # malformed line ends the block
        b"Subject: no empty line at all",
        b"\r\nbody only",
        b"X-Long: " + b"v" * 70_000 + b"\n\nbody",  # over the value bound
        b"".join(b"X-%d: v\n" % n for n in range(1200)) + b"\nbody",  # over the field count
    )
    cases = [*well_formed, *odd, *(raw for _name, raw in hostile_corpus())]
    for raw in cases:
        fast = _split_well_formed(raw, 0, len(raw), 1000)
        careful = _split_line_by_line(raw, 0, len(raw), [], 1000)
        assert fast is None or fast == careful, raw[:80]
    assert all(_split_well_formed(raw, 0, len(raw), 1000) is not None for raw in well_formed)
    assert all(_split_well_formed(raw, 0, len(raw), 1000) is None for raw in odd)


# As in SpamAssassin's t/data/spam/utf16.eml: UTF-16 without a byte-order mark (little-endian).
UTF16_SUBJECT = "=?utf-16?b?" + base64.b64encode("Design your future".encode("utf-16-le")).decode() + "?="


def test_utf16_without_a_byte_order_mark_decodes_as_bytes_decode_does() -> None:
    body = "Plain text, sent as UTF-16.\n".encode("utf-16-le")
    parsed = parse_message(
        f"From: a@example.org\r\nSubject: {UTF16_SUBJECT}\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(body)
    )
    assert parsed.subject == "Design your future" == "Design your future".encode("utf-16-le").decode("utf-16")
    assert parsed.body_text == "Plain text, sent as UTF-16.\n"
    assert not [
        problem for problem in parsed.problems if problem.startswith(("charset", "body", "header-nul"))
    ]
    # A byte-order mark still decides, and UTF-32 reads the same way.
    big_endian = codecs.BOM_UTF16_BE + "Grüße".encode("utf-16-be")
    utf32 = "Grüße".encode("utf-32-le")
    for charset, data in (("utf-16", big_endian), ("utf-32", utf32)):
        word = f"=?{charset}?b?{base64.b64encode(data).decode()}?="
        assert parse_message(f"Subject: {word}\r\n\r\n".encode()).subject == "Grüße"
