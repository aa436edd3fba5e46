"""The proxy's split of a client's bytes into commands (literals belong to the command they
follow), and its stall: commands still reach the server, no answer reaches the client."""

from __future__ import annotations

import socket
import time

import pytest

from bench.imap_proxy import CommandLines, CountingProxy, command_verb
from localmail.dovecot import LocalDovecot


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


def test_a_stalled_proxy_forwards_commands_and_drops_every_answer(dovecot: LocalDovecot) -> None:
    with (
        CountingProxy(dovecot.host, dovecot.imap_port) as proxy,
        socket.create_connection((proxy.host, proxy.port), timeout=10) as client,
    ):
        assert client.recv(4096).startswith(b"* OK")
        client.sendall(b"a1 NOOP\r\n")
        assert b"a1 OK" in client.recv(4096)
        proxy.stalled = True
        answered = proxy.snapshot().server_bytes
        client.sendall(b"a2 NOOP\r\n")
        # The server answered (the proxy read it) and the client got none of it.
        deadline = time.monotonic() + 10
        while proxy.snapshot().server_bytes == answered:
            assert time.monotonic() < deadline, "the server's answer never reached the proxy"
            time.sleep(0.01)
        assert proxy.snapshot().commands == ["NOOP", "NOOP"]
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(4096)
