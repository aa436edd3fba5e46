"""The composed reply: recipient choice, headers, threading, and header-injection resistance."""

from __future__ import annotations

import gc
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import getaddresses

import pytest

from emailops.mime.model import Address
from emailops.replies.compose import (
    MAX_REFERENCES,
    AddressError,
    build_reply,
    choose_recipient,
    reply_subject,
    validate_addr_spec,
)
from tests.reply_factories import parsed_message

NOW = datetime(2024, 5, 6, 8, 0, 0, tzinfo=UTC)
EXPECTED_HEADERS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Auto-Submitted",
    "X-Auto-Response-Suppress",
    "Content-Type",
    "Content-Transfer-Encoding",
    "MIME-Version",
]


def compose(parsed=None, **kwargs):  # type: ignore[no-untyped-def]
    args = {
        "from_address": "Support <me@example.net>",
        "inbound_key": "<m1@example.org>",
        "rule_name": "ack",
        "body_text": "Thanks, we got it.\n",
        "now": NOW,
    } | kwargs
    return build_reply(parsed or parsed_message(), **args)


def reparse(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_headers_of_a_plain_reply() -> None:
    reply = compose(parsed_message(references=("<r0@x>", "<r1@x>")))
    msg = reparse(reply.raw)
    assert sorted(msg.keys()) == sorted(EXPECTED_HEADERS)
    assert msg["From"] == "Support <me@example.net>"
    assert msg["To"] == "Alice Example <alice@example.org>"
    assert msg["Subject"] == "Re: Need help with my order"
    assert msg["In-Reply-To"] == "<m1@example.org>"
    assert msg["References"] == "<r0@x> <r1@x> <m1@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] == "Mon, 06 May 2024 08:00:00 +0000"
    assert msg["Message-ID"] == reply.message_id
    assert reply.message_id.startswith("<autoreply.") and reply.message_id.endswith("@example.net>")
    assert msg.get_content().replace("\r\n", "\n") == "Thanks, we got it.\n"
    assert reply.recipient == "alice@example.org"
    assert reply.subject == "Re: Need help with my order"
    assert b"\r\n" in reply.raw and b"\n" not in reply.raw.replace(b"\r\n", b"")


def test_message_id_is_deterministic_per_inbound_and_rule() -> None:
    assert compose().message_id == compose(now=datetime(2030, 1, 1, tzinfo=UTC)).message_id
    assert compose().message_id != compose(rule_name="other").message_id
    assert compose().message_id != compose(inbound_key="<m2@example.org>").message_id


def test_reply_to_wins_over_from_when_single() -> None:
    single = parsed_message(reply_to=(Address("Desk", "desk@example.org"),))
    assert choose_recipient(single).email == "desk@example.org"
    several = parsed_message(reply_to=(Address("", "a@example.org"), Address("", "b@example.org")))
    assert choose_recipient(several).email == "alice@example.org"


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        ("Hello", "Re: Hello"),
        ("Re: Hello", "Re: Hello"),
        ("RE: Hello", "RE: Hello"),
        ("AW: Hallo", "AW: Hallo"),
        ("Re[2]: x", "Re[2]: x"),
        ("", "Re:"),
        ("Regarding", "Re: Regarding"),
    ],
)
def test_subject_prefix(original: str, expected: str) -> None:
    assert reply_subject(original) == expected


def test_rule_subject_and_html_alternative() -> None:
    msg = reparse(compose(subject="Your ticket", html_text="<p>Thanks</p>").raw)
    assert msg["Subject"] == "Your ticket"
    assert msg.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in msg.iter_parts()]
    assert parts == ["text/plain", "text/html"]


def test_non_ascii_is_encoded_never_8bit() -> None:
    parsed = parsed_message(subject="Grüße — 你好", from_=(Address("Zoë Ünïcode", "zoe@example.org"),))
    reply = compose(parsed, body_text="Grüße, Zoë\n")
    assert reply.raw.isascii()
    msg = reparse(reply.raw)
    assert msg["Subject"] == "Re: Grüße — 你好"
    assert msg["To"].addresses[0].display_name == "Zoë Ünïcode"
    assert msg.get_content().replace("\r\n", "\n") == "Grüße, Zoë\n"


def test_references_are_bounded_and_malformed_ids_dropped() -> None:
    refs = (*tuple(f"<r{i}@x>" for i in range(200)), "not-an-id", "<a b@c>")
    msg = reparse(compose(parsed_message(references=refs)).raw)
    kept = msg["References"].split()
    assert len(kept) == MAX_REFERENCES
    assert kept[0] == "<r0@x>" and kept[-1] == "<m1@example.org>" and "<r199@x>" in kept


INJECTIONS = [
    "Hello\r\nBcc: victim@evil.example",
    "Hello\nX-Injected: 1",
    "Hello\r\n\r\nbody injection",
    "Hello\x00\rBcc: victim@evil.example",
    "=?utf-8?q?Hello=0D=0ABcc=3A_victim=40evil.example?=",
    "=?utf-8?b?SGVsbG8NCkJjYzogdmljdGltQGV2aWwuZXhhbXBsZQ==?=",
    "x =?utf-8?q?=3D=3Futf-8=3Fq=3FA=3D0D=3D0ABcc:_v@e.x=3F=3D?= y",
    "=?bogus-charset?q?a=0D=0AX-Injected:_1?=",
]


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_injection_in_subject_and_names_adds_no_header_and_no_recipient(hostile: str) -> None:
    parsed = parsed_message(
        subject=hostile,
        from_=(Address(hostile, "alice@example.org"),),
        reply_to=(Address(hostile + ', "x" <victim@evil.example>', "alice@example.org"),),
        message_id="<m1@example.org>\r\nBcc: victim@evil.example",
        references=("<r@x>\r\nX-Injected: 1",),
    )
    reply = compose(parsed)
    msg = reparse(reply.raw)
    assert sorted(msg.keys()) == sorted(k for k in EXPECTED_HEADERS if k not in ("In-Reply-To", "References"))
    assert msg.defects == []
    recipients = getaddresses(msg.get_all("To", []) + msg.get_all("Cc", []) + msg.get_all("Bcc", []))
    assert [addr for _, addr in recipients] == ["alice@example.org"]
    assert reply.recipient == "alice@example.org"
    assert "\n" not in msg["Subject"] and "\r" not in msg["Subject"]
    assert msg.get_content().replace("\r\n", "\n") == "Thanks, we got it.\n"


@pytest.mark.parametrize(
    "address",
    [
        "alice@example.org, victim@evil.example",
        "alice@example.org\r\nBcc: victim@evil.example",
        "Alice <alice@example.org>",
        "alice@example.org>",
        "<alice@example.org>",
        "alice",
        "alice@",
        "@example.org",
        "a b@example.org",
        '"quoted"@example.org',
        "alice@exa mple.org",
        "alice@-example.org",
        "alice@example.org ",
        "ålice@example.org",
        "a" * 65 + "@example.org",
    ],
)
def test_recipient_must_be_one_plain_addr_spec(address: str) -> None:
    with pytest.raises(AddressError):
        validate_addr_spec(address)
    with pytest.raises(AddressError):
        compose(parsed_message(from_=(Address("", address),)))


@pytest.mark.parametrize(
    "address", ["alice@example.org", "a.b+tag@sub.example.co.uk", "user@localhost", "o'neil@x.ie"]
)
def test_plain_addresses_are_accepted(address: str) -> None:
    assert validate_addr_spec(address) == address


def test_composing_replies_leaves_nothing_for_the_cycle_collector() -> None:
    """Issue 14: the stdlib made a new class for every header (about 25 per reply), left in
    reference cycles that mostly waited for the garbage collector's rare full collections."""
    compose()  # the class of each kind of header is made once, here
    gc.collect()
    gc.disable()
    try:
        for n in range(50):
            compose(parsed_message(subject=f"order {n}"), inbound_key=f"<m{n}@example.org>")
        unreachable = gc.collect()
    finally:
        gc.enable()
    # Before the fix: 75 objects per reply (3,750); now none. The margin is for anything else the
    # test process might run meanwhile.
    assert unreachable < 50, f"{unreachable} objects left in reference cycles by 50 replies"
