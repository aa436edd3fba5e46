"""The proxy's split of a client's bytes into commands: literals belong to the command they follow."""

from __future__ import annotations

from bench.imap_proxy import CommandLines, command_verb


def test_a_literal_and_the_rest_of_its_line_are_part_of_the_command() -> None:
    lines = CommandLines()
    body = b"Subject: x\r\n\r\nA1 LOGOUT looks like a command\r\n"
    sent = b"A1 APPEND Drafts (\\Draft) {%d}\r\n" % len(body) + body + b"\r\nA2 NOOP\r\n"
    # Fed in small pieces, as TCP may deliver them: a literal cut anywhere is still skipped.
    seen = [line for start in range(0, len(sent), 7) for line in lines.feed(sent[start : start + 7])]
    assert [command_verb(line) for line in seen] == ["APPEND", "NOOP"]


def test_a_non_synchronizing_literal_and_two_literals_in_one_command() -> None:
    lines = CommandLines()
    seen = lines.feed(b"A1 LOGIN {5+}\r\nalice {3+}\r\npw!\r\nA2 SELECT INBOX\r\nDONE\r\n")
    assert [command_verb(line) for line in seen] == ["LOGIN", "SELECT", "DONE"]
