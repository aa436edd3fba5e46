"""RFC 3834 / RFC 5230 loop safety: each robot case is suppressed with a reason."""

from __future__ import annotations

from typing import Any

import pytest

from emailops.mime.model import Address
from emailops.replies.robots import reply_suppression_reason
from tests.reply_factories import parsed_message, reply_config


def test_a_personal_message_may_be_answered() -> None:
    assert reply_suppression_reason(parsed_message(), reply_config()) is None
    assert (
        reply_suppression_reason(parsed_message(headers={"Auto-Submitted": ["no"]}), reply_config()) is None
    )
    assert reply_suppression_reason(parsed_message(return_path=None), reply_config()) is None


def frm(address: str) -> dict[str, Any]:
    return {"from_": (Address("", address),), "return_path": address}


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"headers": {"Auto-Submitted": ["auto-replied"]}}, "auto-submitted: auto-replied"),
        ({"auto_submitted": "auto-generated"}, "auto-submitted: auto-generated"),
        (
            {"headers": {"Auto-Submitted": ["Auto-Notified; owner-email=x@y"]}},
            "auto-submitted: auto-notified",
        ),
        ({"headers": {"Precedence": ["bulk"]}}, "precedence: bulk"),
        ({"headers": {"Precedence": ["List"]}}, "precedence: list"),
        ({"headers": {"Precedence": ["junk"]}}, "precedence: junk"),
        ({"headers": {"List-Unsubscribe": ["<mailto:u@x>"]}}, "mailing list (list-unsubscribe)"),
        ({"headers": {"List-Id": ["<l.example.org>"]}}, "mailing list (list-id)"),
        ({"list_id": "<l.example.org>"}, "mailing list (list-id)"),
        ({"headers": {"X-Auto-Response-Suppress": ["All"]}}, "x-auto-response-suppress: all"),
        ({"headers": {"X-Auto-Response-Suppress": ["DR, AutoReply"]}}, "x-auto-response-suppress: autoreply"),
        ({"headers": {"X-Auto-Response-Suppress": ["OOF"]}}, "x-auto-response-suppress: oof"),
        ({"return_path": ""}, "null return path (<>)"),
        (frm("MAILER-DAEMON@example.org"), "role address mailer-daemon"),
        (frm("postmaster@example.org"), "role address postmaster"),
        (frm("LISTSERV@example.org"), "role address listserv"),
        (frm("majordomo@example.org"), "role address majordomo"),
        (frm("users-request@lists.example.org"), "list request address (*-request)"),
        (frm("owner-users@lists.example.org"), "list owner address (owner-*)"),
        (frm("noreply@example.org"), "no-reply address"),
        (frm("no-reply@example.org"), "no-reply address"),
        (frm("No_Reply+abc@example.org"), "no-reply address"),
        (frm("do-not-reply@example.org"), "no-reply address"),
        (frm("donotreply-billing@example.org"), "no-reply address"),
        ({"return_path": "owner-list@lists.example.org"}, "list owner address (owner-*)"),
        ({"reply_to": (Address("", "noreply@example.org"),)}, "no-reply address"),
        (frm("me@example.net"), "own address"),
        (frm("ME.Alias@example.net"), "own address"),
        ({"message_id": "<autoreply.0123abcd@example.net>"}, "our own automatic reply"),
        ({"from_": (Address("", "not an address"),)}, "no valid address to reply to"),
        ({"from_": ()}, "no valid address to reply to"),
    ],
)
def test_robot_cases(overrides: dict[str, Any], reason: str) -> None:
    found = reply_suppression_reason(parsed_message(**overrides), reply_config())
    assert found is not None and found.startswith(reason)


def test_not_robots() -> None:
    for address in (
        "noreplyer@example.org",
        "request@example.org",
        "owner@example.org",
        "replies@example.org",
    ):
        assert reply_suppression_reason(parsed_message(**frm(address)), reply_config()) is None, address


def test_never_reply_to_globs() -> None:
    config = reply_config(never_reply_to=("*@partner.example", "Boss@Example.org"))
    assert reply_suppression_reason(parsed_message(**frm("x@partner.example")), config) == (
        "never-reply list (*@partner.example)"
    )
    assert reply_suppression_reason(parsed_message(**frm("boss@example.org")), config) == (
        "never-reply list (Boss@Example.org)"
    )
    assert reply_suppression_reason(parsed_message(**frm("x@partner.example.com")), config) is None
