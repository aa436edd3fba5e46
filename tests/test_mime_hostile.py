"""Every hostile message parses without raising, in bounded time and memory, as well as it can."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from emailops.mime.header_block import MAX_HEADERS
from emailops.mime.headers import MAX_HEADER_VALUE_CHARS
from emailops.mime.parse import parse_message
from tests.corpus.hostile import (
    CASES,
    HUGE_ATTACHMENT_BYTES,
    INJECTED_ADDRESS,
    HostileCase,
    hostile_corpus,
    huge_attachment_message,
    write_huge_attachment,
)

# Generous (the slowest case takes about 0.3 s; bench/bench_parse.py prints figures): a super-linear
# blow-up takes minutes, a machine busy with other work only a few times longer.
PARSE_SECONDS_LIMIT = 5.0


def _all_header_strings(parsed) -> list[str]:
    strings = [parsed.subject, *(value for values in parsed.headers.values() for value in values)]
    for address in (*parsed.from_, *parsed.to, *parsed.cc, *parsed.reply_to):
        strings += [address.name, address.email]
    strings += [attachment.filename or "" for attachment in parsed.attachments]
    return strings


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_hostile_message_is_parsed_within_bounds(case: HostileCase) -> None:
    raw = case.build()
    started = time.perf_counter()
    parsed = parse_message(raw)
    elapsed = time.perf_counter() - started

    assert elapsed < PARSE_SECONDS_LIMIT, f"{case.name} took {elapsed:.3f}s"
    assert parsed.size == len(raw)
    assert not any(problem.startswith("parser-error") for problem in parsed.problems)
    for problem in case.problems:
        assert problem in parsed.problems
    for word in case.body_words:
        assert word in parsed.body_text
    for word in case.subject_words:
        assert word in parsed.subject
    for value in _all_header_strings(parsed):
        assert not any(char in value for char in "\r\n\x00"), (case.name, value[:80])
        assert len(value) <= MAX_HEADER_VALUE_CHARS
    assert sum(len(values) for values in parsed.headers.values()) <= MAX_HEADERS
    assert "\x00" not in parsed.body_text


def test_header_injection_never_creates_a_header() -> None:
    for build in (CASES_BY_NAME["header-injection-encoded"], CASES_BY_NAME["header-injection-folded"]):
        parsed = parse_message(build())
        assert "bcc" not in parsed.headers
        assert parsed.subject == f"hi Bcc: {INJECTED_ADDRESS}"
    parsed = parse_message(CASES_BY_NAME["header-injection-encoded"]())
    assert parsed.from_[0].email == "boss@example.org"
    assert parsed.from_[0].name == f"Boss Bcc: {INJECTED_ADDRESS}"
    assert parsed.reply_to[0].email == "reply@example.org"


def test_html_only_mail_drops_script_and_style() -> None:
    parsed = parse_message(CASES_BY_NAME["html-only"]())
    assert "scriptword" not in parsed.body_text
    assert "color" not in parsed.body_text
    assert "Visible flamingo paragraph" in parsed.body_text


def test_deep_nesting_stops_at_the_depth_bound() -> None:
    parsed = parse_message(CASES_BY_NAME["deep-nesting"]())
    assert "deepest text" not in parsed.body_text  # 200 levels deep, past the bound of 32


def test_attachment_filenames_are_decoded_and_sized() -> None:
    parsed = parse_message(CASES_BY_NAME["attachment-filenames"]())
    names = {attachment.filename: attachment for attachment in parsed.attachments}
    assert names["résumé.pdf"].content_type == "application/pdf"
    assert names["résumé.pdf"].size == len(b"%PDF-1.4 fake") * 100
    assert names["bild grüße.png"].size == 8


def test_hostile_corpus_lists_every_small_case() -> None:
    corpus = hostile_corpus()
    assert [name for name, _ in corpus] == [case.name for case in CASES]
    assert all(isinstance(raw, bytes) and raw for _, raw in corpus)


def test_fifty_megabyte_attachment_is_measured_without_copies() -> None:
    raw = huge_attachment_message()
    tracemalloc.start()
    try:
        started = time.perf_counter()
        parsed = parse_message(raw)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < PARSE_SECONDS_LIMIT * 2  # tracemalloc slows allocation; the figure is ~0.3 s
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes beyond the raw message"
    assert parsed.truncated and "message-truncated" in parsed.problems
    assert "manatee" in parsed.body_text
    (attachment,) = parsed.attachments
    assert attachment.filename == "huge.bin"
    assert attachment.size == HUGE_ATTACHMENT_BYTES


def test_huge_attachment_written_to_file_matches_the_message_size(tmp_path) -> None:
    path = write_huge_attachment(tmp_path / "huge.eml", size=1_000_003)
    parsed = parse_message(path.read_bytes())
    assert parsed.attachments[0].size == 1_000_003
    assert not parsed.truncated


CASES_BY_NAME = {case.name: case.build for case in CASES}


def test_mail_declaring_many_unknown_charsets_leaves_the_codec_caches_as_they_were() -> None:
    # The codec registry keeps every name it is asked for; asked for each label as written, a
    # worker kept an entry for every distinct unknown charset that mail declared, for ever.
    import encodings

    def message(n: int) -> bytes:
        return (
            f"From: a@example.org\r\nSubject: =?x-made-up-{n}?Q?hi?=\r\n"
            f'Content-Type: text/plain; charset="x-made-up-{n}"\r\n\r\nhello {n}\r\n'
        ).encode()

    parse_message(message(0))
    before = len(encodings._cache)  # type: ignore[attr-defined]
    for n in range(1, 3001):
        assert "hello" in parse_message(message(n)).body_text
    assert len(encodings._cache) == before  # type: ignore[attr-defined]
    latin = b"From: a@example.org\r\nContent-Type: text/plain; charset=ISO_8859-1\r\n\r\ncaf\xe9\r\n"
    assert parse_message(latin).body_text.strip() == "caf\u00e9"
