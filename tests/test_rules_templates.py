"""Templates: placeholders, escaping, and no way to reach code or objects."""

from __future__ import annotations

import pytest

from emailops.mime.model import Address
from emailops.rules.templates import PLACEHOLDERS, Template, TemplateError, template_values
from tests.reply_factories import parsed_message


def values() -> dict[str, str]:
    return template_values(parsed_message(), folder="INBOX", rule="ack", my_address="me@example.net")


def test_all_placeholders_render() -> None:
    text = " ".join("{" + name + "}" for name in PLACEHOLDERS)
    rendered = Template.parse(text).render(values())
    assert rendered == (
        "Alice Example alice@example.org Need help with my order Mon, 06 May 2024 07:08:09 +0000 "
        "<m1@example.org> me@example.net INBOX ack me@example.net"
    )


def test_sender_name_falls_back_to_address_and_missing_values_are_empty() -> None:
    parsed = parsed_message(from_=(Address("", "bob@example.org"),), date=None, message_id=None)
    vals = template_values(parsed, folder="INBOX", rule="r", my_address="me@example.net")
    assert vals["sender_name"] == "bob@example.org"
    assert vals["date"] == "" and vals["message_id"] == ""


def test_literal_braces_and_values_are_not_reinterpreted() -> None:
    hostile = parsed_message(subject="{sender.__class__} {0} {{x}}")
    vals = template_values(hostile, folder="INBOX", rule="r", my_address="me@example.net")
    assert Template.parse("{{literal}} {subject}").render(vals) == "{literal} {sender.__class__} {0} {{x}}"


def test_html_rendering_escapes_values() -> None:
    vals = values() | {"subject": "<script>alert(1)</script> & co"}
    html = Template.parse("<p>{subject}</p>").render(vals, escape_html=True)
    assert html == "<p>&lt;script&gt;alert(1)&lt;/script&gt; &amp; co</p>"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{nope}", "unknown placeholder {nope}"),
        ("{sender.__class__.__mro__}", "attribute and index access are not allowed"),
        ("{sender[0]}", "attribute and index access are not allowed"),
        ("{0}", "has no name"),
        ("{}", "has no name"),
        ("{subject!r}", "conversions and format specs are not allowed"),
        ("{subject:>1000000000}", "conversions and format specs are not allowed"),
        ("{subject:{sender}}", "conversions and format specs are not allowed"),
        ("{subject", "malformed template"),
    ],
)
def test_rejected_templates(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("[", r"\[")):
        Template.parse(source)
