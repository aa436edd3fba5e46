"""Pins what ``emailops/imap/imaplib_internals.py`` relies on in imaplib below imapclient, against a
real Dovecot: an upgrade of imapclient or Python that changes one of these fails here first."""

from __future__ import annotations

import imaplib
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from imapclient import IMAPClient

from emailops.config import TlsSecurity
from emailops.imap.announcements import PendingInput, pending_input
from emailops.imap.connection import connect, logout_quietly
from emailops.imap.imaplib_internals import (
    read_ahead_buffer,
    set_aside_answers,
    silence_imaplib_debug,
    uid_command,
)
from emailops.network_waits import WAITS, Wait
from localmail.dovecot import LocalDovecot
from tests.index_helpers import ALICE, imap_config, message


@pytest.fixture
def client(dovecot: LocalDovecot) -> Iterator[IMAPClient]:
    imap = connect(imap_config(dovecot))
    yield imap
    logout_quietly(imap)


def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the server did not answer in time"
        time.sleep(0.05)


def test_raw_uid_fetch_splits_each_message_into_head_and_literal(
    dovecot: LocalDovecot, client: IMAPClient
) -> None:
    raw = message(1)
    dovecot.append(ALICE, "INBOX", raw)
    client.select_folder("INBOX")
    typ, data = uid_command(client, "FETCH", "1:*", "(UID RFC822.SIZE BODY.PEEK[])")
    assert typ == "OK"
    (head, literal), rest = data[0], data[1:]
    assert isinstance(head, bytes) and b"UID 1 " in head and f"RFC822.SIZE {len(raw)}".encode() in head
    assert literal == raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert rest == [b")"]
    # A range past the last UID is still a range (RFC 3501: "*" is the largest UID): no error.
    typ, _ = uid_command(client, "FETCH", "999:*", "(UID)")
    assert typ == "OK"


def test_untagged_answers_during_a_command_are_set_aside_by_kind(
    dovecot: LocalDovecot, client: IMAPClient
) -> None:
    client.select_folder("INBOX")
    dovecot.append(ALICE, "INBOX", message(1))

    def told() -> bool:
        client.search("ALL")  # imapclient claims the SEARCH answer, not the EXISTS beside it
        return "EXISTS" in set_aside_answers(client)

    _eventually(told)
    assert set_aside_answers(client).pop("EXISTS")[-1] == b"1"


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_pending_input_tells_nothing_from_data_from_a_close(dovecot_tls: LocalDovecot, tls: bool) -> None:
    # Over a plaintext socket imaplib's buffered reader turns "nothing yet" into b"", as it does
    # end of file: before, every plaintext IDLE connection was taken for closed and dropped.
    config = imap_config(dovecot_tls)
    if tls:
        assert dovecot_tls.imaps_port is not None
        config = imap_config(
            dovecot_tls, port=dovecot_tls.imaps_port, security=TlsSecurity.SSL, ca_file=dovecot_tls.ca_file
        )
    client = connect(config)
    try:
        client.select_folder("INBOX")
        assert hasattr(read_ahead_buffer(client), "peek")
        assert pending_input(client) is PendingInput.NOTHING
        client.idle()
        assert pending_input(client) is PendingInput.NOTHING
        dovecot_tls.append(ALICE, "INBOX", message(1))
        _eventually(lambda: pending_input(client) is PendingInput.DATA)
        client.idle_done()  # reads what was pending
        client.idle()
        assert pending_input(client) is PendingInput.NOTHING
        assert dovecot_tls.kill_imap_connections(ALICE) >= 1  # closed without BYE
        _eventually(lambda: pending_input(client) is PendingInput.CLOSED)
    finally:
        client.shutdown()


def test_debug_level_zero_stops_imaplib_formatting_answers(dovecot: LocalDovecot) -> None:
    imap = IMAPClient(dovecot.host, dovecot.imap_port, ssl=False, timeout=10)
    try:
        formatted: list[str] = []
        imap._imap._mesg = lambda text, *args: formatted.append(text)
        assert imap._imap.debug > 0  # imapclient turns imaplib's debug output on
        imap.noop()
        assert formatted
        silence_imaplib_debug(imap)
        formatted.clear()
        imap.noop()
        assert formatted == []
    finally:
        imap.shutdown()


def test_every_call_on_the_socket_is_a_network_wait_and_a_timeout_a_silence(
    dovecot: LocalDovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"{dovecot.host}:{dovecot.imap_port}"
    seen: list[Wait | None] = []
    readline = imaplib.IMAP4.readline

    def watched_readline(imap: imaplib.IMAP4) -> bytes:  # what the worker's beat thread sees
        seen.append(WAITS.in_flight(threading.get_ident()))
        return readline(imap)

    monkeypatch.setattr(imaplib.IMAP4, "readline", watched_readline)
    client = connect(imap_config(dovecot, timeout_seconds=1.0))
    client.noop()
    assert seen and all(wait is not None and wait.endpoint == endpoint for wait in seen)
    assert endpoint not in {silence.endpoint for silence in WAITS.silences()}
    dovecot.freeze()
    try:
        with pytest.raises(TimeoutError):
            client.noop()
        assert endpoint in {silence.endpoint for silence in WAITS.silences()}
    finally:
        dovecot.thaw()
        client.shutdown()
    logout_quietly(connect(imap_config(dovecot)))  # an answer from the server ends the silence
    assert endpoint not in {silence.endpoint for silence in WAITS.silences()}
