"""Generators of hostile messages: broken encodings, bad charsets, huge and deeply nested input.

Each ``HostileCase`` builds its message bytes on demand and states what a robust parser must make of
it: the problems it records and words that must be found (in the body text, the subject, or an
attachment's filename). ``hostile_corpus()`` gives the small ones (all but the 50 MB attachment) for
the integration tests; ``huge_attachment_message`` / ``write_huge_attachment`` give the big one.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CRLF = b"\r\n"
HUGE_ATTACHMENT_BYTES = 50 * 1024 * 1024
INJECTED_ADDRESS = "x@evil.example"


@dataclass(frozen=True)
class HostileCase:
    name: str
    build: Callable[[], bytes]
    problems: tuple[str, ...] = ()  # each must be in ParsedMessage.problems
    body_words: tuple[str, ...] = ()  # each must be in ParsedMessage.body_text
    subject_words: tuple[str, ...] = ()  # each must be in ParsedMessage.subject


def _message(headers: list[str], body: bytes | str, *, standard: bool = True) -> bytes:
    """Headers (``"Name: value"``, CRLF-joined), an empty line, then the body."""
    lines = list(headers)
    if standard:
        names = {line.split(":", 1)[0].lower() for line in lines}
        defaults = {
            "from": "From: Hostile Sender <sender@example.org>",
            "to": "To: Indexer <index@example.net>",
            "date": "Date: Tue, 03 Mar 2026 10:00:00 +0100",
            "message-id": f"Message-ID: <hostile-{abs(hash(tuple(lines))) % 10**9}@example.org>",
        }
        lines = [value for key, value in defaults.items() if key not in names] + lines
    if isinstance(body, str):
        body = body.encode("utf-8")
    return CRLF.join(line.encode("utf-8") for line in lines) + CRLF + CRLF + body


def _base64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


# --- encodings and charsets -----------------------------------------------------------------------


def broken_base64() -> bytes:
    good = base64.b64encode(b"the quokka base64 survivor lives here. ").decode()
    # A stray character count that is 1 more than a multiple of 4, and junk inside.
    body = good[:20] + "!!**" + good[20:] + "Q"
    return _message(
        [
            "Subject: broken base64",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: base64",
        ],
        body + "\r\n",
    )


def broken_quoted_printable() -> bytes:
    body = "caf=C3=A9 quixotic =ZZ broken =4 escapes and a soft=\r\nbreak =\r\n"
    return _message(
        [
            "Subject: broken qp",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
        ],
        body,
    )


def unknown_charset() -> bytes:
    return _message(
        ["Subject: =?x-foo?q?mystery_subject?=", "Content-Type: text/plain; charset=x-foo"],
        "zebrafish in an unknown charset, naïve\r\n",
    )


def charset_mismatch() -> bytes:
    body = "declared utf-8 but latin-1: cr\u00e8me br\u00fbl\u00e9e pelican\r\n".encode("latin-1")
    return _message(["Subject: mismatch", "Content-Type: text/plain; charset=utf-8"], body)


def nul_bytes() -> bytes:
    raw = _message(["Subject: nul\x00in\x00subject", "Content-Type: text/plain"], "nul\x00bytes pangolin\r\n")
    return raw


def base64_text_body() -> bytes:
    text = "Grüße aus Zürich: the armadillo is in a base64 body.\r\n" * 3
    return _message(
        [
            "Subject: base64 body",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: base64",
        ],
        _base64_lines(text.encode("utf-8")),
    )


def encoded_word_subject() -> bytes:
    # "Überraschung narwhal ☃" split inside the multi-byte snowman across two adjacent words.
    snowman = "☃".encode()
    first = base64.b64encode("Überraschung narwhal ".encode() + snowman[:1]).decode()
    second = base64.b64encode(snowman[1:]).decode()
    return _message(
        [f"Subject: =?utf-8?b?{first}?=\r\n =?utf-8?b?{second}?=", "Content-Type: text/plain"],
        "encoded-word subject\r\n",
    )


def malformed_encoded_words() -> bytes:
    # Glued to text, inside quotes, lower-case q, spaces inside the word, unknown charset in a name.
    return _message(
        [
            'From: "=?iso-8859-1?q?J=F6rg?=" <jorg@example.org>',
            "Subject: pre=?utf-8?q?fix_walrus?=post =?UTF-8?Q?with space?= =?utf-8?B?YnJva2Vu?",
            "Content-Type: text/plain",
        ],
        "malformed encoded words\r\n",
    )


# --- headers ----------------------------------------------------------------------------------------


def missing_headers() -> bytes:
    return _message(["Subject: nothing else"], "no from, no date, no message-id: tapir\r\n", standard=False)


def duplicate_headers() -> bytes:
    return _message(
        [
            "Subject: first subject",
            "Subject: second subject",
            "From: one@example.org",
            "From: two@example.org",
            "Content-Type: text/plain",
        ],
        "duplicates: ocelot\r\n",
    )


def ten_thousand_headers() -> bytes:
    filler = [f"X-Filler-{index}: value {index}" for index in range(10_000)]
    return _message(
        ["Subject: many headers", *filler, "Content-Type: text/plain"], "after many headers: ibex\r\n"
    )


def megabyte_header_line() -> bytes:
    return _message(
        ["Subject: long header", "X-Long: " + "a" * (1024 * 1024)], "after a long header: lemur\r\n"
    )


def megabyte_of_encoded_words() -> bytes:
    word = "=?utf-8?q?caf=C3=A9_?="
    words = " ".join([word] * (1024 * 1024 // (len(word) + 1)))
    return _message([f"Subject: {words}", "Content-Type: text/plain"], "after encoded words: meerkat\r\n")


def header_injection_encoded() -> bytes:
    injected_q = f"=?utf-8?q?hi=0D=0ABcc:_{INJECTED_ADDRESS}=0D=0A?="
    injected_b = base64.b64encode(f"Boss\r\nBcc: {INJECTED_ADDRESS}".encode()).decode()
    return _message(
        [
            f"Subject: {injected_q}",
            f"From: =?utf-8?b?{injected_b}?= <boss@example.org>",
            f"Reply-To: =?utf-8?q?x=0ABcc:_{INJECTED_ADDRESS}?= <reply@example.org>",
            "Content-Type: text/plain",
        ],
        "header injection attempt: okapi\r\n",
    )


def header_injection_folded() -> bytes:
    return _message(
        [
            f"Subject: hi\r\n Bcc: {INJECTED_ADDRESS}",
            f"X-Bare-Cr: one\rBcc: {INJECTED_ADDRESS}",
            "Content-Type: text/plain",
        ],
        "folded injection attempt: axolotl\r\n",
    )


# --- structure --------------------------------------------------------------------------------------


def deep_nesting(levels: int = 200) -> bytes:
    opening = []
    closing = []
    for level in range(levels):
        boundary = f"b{level}"
        opening.append(f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n--{boundary}\r\n')
        closing.append(f"\r\n--{boundary}--\r\n")
    inner = "Content-Type: text/plain\r\n\r\ndeepest text\r\n"
    outer_text = "Content-Type: text/plain\r\n\r\nshallow capybara text\r\n--b0\r\n"
    body = "".join(opening)
    # The first level holds a readable part before the nested chain.
    body = body.replace("--b0\r\n", "--b0\r\n" + outer_text, 1)
    body += inner + "".join(reversed(closing))
    head, _, rest = body.partition("\r\n\r\n")
    return _message(["Subject: deep nesting", head], rest)


def multipart_boundary_missing() -> bytes:
    return _message(
        ["Subject: no boundary", "Content-Type: multipart/mixed"],
        "--x\r\nContent-Type: text/plain\r\n\r\nboundary-less gecko\r\n--x--\r\n",
    )


def multipart_unterminated() -> bytes:
    return _message(
        ["Subject: unterminated", 'Content-Type: multipart/mixed; boundary="zz"'],
        "preamble\r\n--zz\r\nContent-Type: text/plain\r\n\r\nunterminated wombat\r\n",
    )


def multipart_wrong_boundary() -> bytes:
    return _message(
        ["Subject: wrong boundary", 'Content-Type: multipart/alternative; boundary="declared"'],
        "--actual\r\nContent-Type: text/plain\r\n\r\nmismatched boundary yak\r\n--actual--\r\n",
    )


def boundary_prefix_confusion() -> bytes:
    # The inner boundary starts with the outer one: only whole delimiter lines may split.
    return _message(
        ["Subject: prefix boundaries", 'Content-Type: multipart/mixed; boundary="ab"'],
        '--ab\r\nContent-Type: multipart/alternative; boundary="abc"\r\n\r\n'
        "--abc\r\nContent-Type: text/plain\r\n\r\nprefix boundary heron\r\n--abc--\r\n"
        "--ab--\r\n",
    )


def html_only() -> bytes:
    html = (
        "<html><head><style>p { color: red }</style><script>var hidden = 'scriptword';</script></head>"
        "<body><p>Visible <b>flamingo</b> paragraph</p><div>second&nbsp;block</div></body></html>"
    )
    return _message(["Subject: html only", "Content-Type: text/html; charset=utf-8"], html)


def html_nesting_bomb() -> bytes:
    # Unclosed elements with end tags inside: quadratic for an HTML5 tree builder.
    return _message(
        ["Subject: html bomb", "Content-Type: text/html"],
        "<p>bomb hummingbird</p>" + "<div><b>x</b>" * 60_000,
    )


def boundary_flood() -> bytes:
    # A million-ish lines that start like the delimiter but are not one.
    return _message(
        ["Subject: boundary flood", 'Content-Type: multipart/mixed; boundary="b"'],
        "--b\r\nContent-Type: text/plain\r\n\r\nflood marmot\r\n" + "--bx\r\n" * 200_000 + "--b--\r\n",
    )


def attachment_filenames() -> bytes:
    pdf = _base64_lines(b"%PDF-1.4 fake" * 100).decode()
    return _message(
        ["Subject: attachments", 'Content-Type: multipart/mixed; boundary="att"'],
        "--att\r\nContent-Type: text/plain\r\n\r\nsee attached: toucan\r\n"
        "--att\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\r\n" + pdf + "\r\n"
        '--att\r\nContent-Type: image/png; name="=?utf-8?q?bild_gr=C3=BC=C3=9Fe.png?="\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
        "--att--\r\n",
    )


# --- the 50 MB attachment ---------------------------------------------------------------------------


def _huge_parts(size: int) -> tuple[bytes, bytes, int, bytes]:
    """Head, one base64 line, its repeat count and tail of a message with a ``size``-byte attachment."""
    head = _message(
        ["Subject: huge attachment", 'Content-Type: multipart/mixed; boundary="huge"'],
        "--huge\r\nContent-Type: text/plain\r\n\r\nhuge attachment follows: manatee\r\n"
        "--huge\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="huge.bin"\r\n\r\n',
    )
    chunk = os.urandom(57)  # 57 bytes make one 76-character base64 line
    line = base64.b64encode(chunk) + CRLF
    count = size // 57
    tail_bytes = os.urandom(size - count * 57)
    tail = (_base64_lines(tail_bytes) if tail_bytes else b"") + b"--huge--\r\n"
    return head, line, count, tail


def huge_attachment_message(size: int = HUGE_ATTACHMENT_BYTES) -> bytes:
    """A message with one ``size``-byte base64 attachment (about 1.37 x ``size`` bytes in all)."""
    head, line, count, tail = _huge_parts(size)
    return b"".join((head, line * count, tail))


def write_huge_attachment(path: Path, size: int = HUGE_ATTACHMENT_BYTES) -> Path:
    """Write the huge message to ``path`` without holding it in memory; return ``path``."""
    head, line, count, tail = _huge_parts(size)
    block = line * 10_000
    with Path(path).open("wb") as out:
        out.write(head)
        for _ in range(count // 10_000):
            out.write(block)
        out.write(line * (count % 10_000))
        out.write(tail)
    return Path(path)


# --- the catalogue ----------------------------------------------------------------------------------

CASES: tuple[HostileCase, ...] = (
    HostileCase("broken-base64", broken_base64, ("base64-broken",), ("quokka",)),
    HostileCase(
        "broken-quoted-printable", broken_quoted_printable, ("quoted-printable-broken",), ("quixotic",)
    ),
    HostileCase(
        "unknown-charset", unknown_charset, ("charset-unknown:x-foo",), ("zebrafish", "naïve"), ("mystery",)
    ),
    HostileCase("charset-mismatch", charset_mismatch, ("charset-mismatch:utf-8",), ("crème", "pelican")),
    HostileCase("nul-bytes", nul_bytes, ("header-nul", "body-nul"), ("nulbytes",), ("nulinsubject",)),
    HostileCase("base64-text-body", base64_text_body, (), ("armadillo", "Zürich")),
    HostileCase("encoded-word-subject", encoded_word_subject, (), (), ("Überraschung narwhal ☃",)),
    HostileCase("malformed-encoded-words", malformed_encoded_words, (), (), ("walrus", "with space")),
    HostileCase(
        "missing-headers",
        missing_headers,
        ("header-missing:from", "header-missing:date", "header-missing:message-id"),
        ("tapir",),
    ),
    HostileCase(
        "duplicate-headers",
        duplicate_headers,
        ("header-duplicate:subject", "header-duplicate:from"),
        ("ocelot",),
        ("first subject",),
    ),
    HostileCase("ten-thousand-headers", ten_thousand_headers, ("headers-truncated",), ("ibex",)),
    HostileCase("megabyte-header-line", megabyte_header_line, ("header-value-truncated:x-long",), ("lemur",)),
    HostileCase(
        "megabyte-of-encoded-words",
        megabyte_of_encoded_words,
        ("header-value-truncated:subject",),
        ("meerkat",),
        ("café café",),
    ),
    HostileCase(
        "header-injection-encoded",
        header_injection_encoded,
        ("header-encoded-newline",),
        ("okapi",),
        ("hi Bcc:",),
    ),
    HostileCase("header-injection-folded", header_injection_folded, (), ("axolotl",), ("hi Bcc:",)),
    HostileCase("deep-nesting", deep_nesting, ("nesting-too-deep",), ("capybara",), ("deep nesting",)),
    HostileCase(
        "multipart-boundary-missing", multipart_boundary_missing, ("multipart-boundary-missing",), ("gecko",)
    ),
    HostileCase("multipart-unterminated", multipart_unterminated, ("multipart-unterminated",), ("wombat",)),
    HostileCase("multipart-wrong-boundary", multipart_wrong_boundary, ("multipart-no-parts",), ("yak",)),
    HostileCase("boundary-prefix-confusion", boundary_prefix_confusion, (), ("heron",)),
    HostileCase("html-only", html_only, (), ("flamingo", "second block"), ("html only",)),
    HostileCase("attachment-filenames", attachment_filenames, (), ("toucan",)),
    HostileCase("html-nesting-bomb", html_nesting_bomb, (), ("bomb hummingbird",)),
    HostileCase("boundary-flood", boundary_flood, (), ("flood marmot",)),
)


def hostile_corpus() -> list[tuple[str, bytes]]:
    """Every case but the 50 MB attachment, as (name, message bytes); about 5 MB in all."""
    return [(case.name, case.build()) for case in CASES]
