"""SmtpSender and deliver_next against real SMTP servers on loopback (LocalSmtpRelay / aiosmtpd)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import Engine
from structlog.testing import capture_logs

from emailops import metrics
from emailops.config import ServerConfig, TlsSecurity
from emailops.network_waits import WAITS
from emailops.replies import outbox
from emailops.replies.compose import build_reply
from emailops.replies.delivery import deliver_next
from emailops.replies.outbox import OutboxState
from emailops.replies.smtp_sender import (
    PermanentSendError,
    SmtpAuthError,
    SmtpSecurityError,
    SmtpSender,
    TransientSendError,
    UncertainSendError,
)
from emailops.store.database import create_index_engine
from emailops.store.schema import metadata
from localmail.dovecot import free_loopback_port
from localmail.smtp_relay import LocalSmtpRelay
from tests.reply_factories import parsed_message
from tests.silent_server import resetting_server, silent_server

USER, PASSWORD = "alice@example.test", "alice-pw-s3cret"
T0 = datetime(2024, 5, 6, 8, 0, 0, tzinfo=UTC)


def smtp_config(
    port: int, security: TlsSecurity = TlsSecurity.NONE, ca_file: Path | None = None
) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=port,
        username=USER,
        password=PASSWORD,
        security=security,
        ca_file=ca_file,
        timeout_seconds=5.0,
    )


def raw_reply(n: int = 1) -> bytes:
    parsed = parsed_message(message_id=f"<m{n}@example.org>", from_=(parsed_message().from_[0],))
    return build_reply(
        parsed,
        from_address=USER,
        inbound_key=f"<m{n}@example.org>",
        rule_name="ack",
        body_text=".leading dot line\nThanks.\n",
        now=T0,
    ).raw


@pytest.fixture
def relay() -> Iterator[LocalSmtpRelay]:
    with LocalSmtpRelay(None, {USER: PASSWORD}) as server:
        yield server


def test_delivered_once_with_auth(relay: LocalSmtpRelay) -> None:
    with SmtpSender(smtp_config(relay.port)) as sender:
        answer = sender.send(envelope_from=USER, recipient="alice@example.org", raw=raw_reply())
    assert answer == "2.0.0 Message accepted for delivery"  # the relay's 250 text, code stripped
    (accepted,) = relay.accepted
    assert accepted.rcpt_tos == ("alice@example.org",) and accepted.auth_login == USER
    assert accepted.data.replace(b"\r\n", b"\n") == raw_reply().replace(b"\r\n", b"\n")


def test_connection_reused_for_a_burst_and_reopened_after_a_drop(relay: LocalSmtpRelay) -> None:
    with SmtpSender(smtp_config(relay.port)) as sender:
        for n in range(5):
            sender.send(envelope_from=USER, recipient=f"r{n}@example.org", raw=raw_reply(n))
        assert sender.connections_opened == 1
        relay.stop()
        relay.start()
        sender.send(envelope_from=USER, recipient="late@example.org", raw=raw_reply(9))
        assert sender.connections_opened == 2
    assert len(relay.accepted) == 6


def test_a_connection_unused_for_30_s_is_closed_and_a_burst_reuses_it(relay: LocalSmtpRelay) -> None:
    now = [1000.0]
    with SmtpSender(smtp_config(relay.port), monotonic=lambda: now[0]) as sender:
        sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply(1))
        now[0] += SmtpSender.IDLE_CLOSE_SECONDS - 1
        sender.close_if_unused()  # used 29 s ago: kept for the burst
        sender.send(envelope_from=USER, recipient="b@example.org", raw=raw_reply(2))
        assert sender.connections_opened == 1
        now[0] += SmtpSender.IDLE_CLOSE_SECONDS
        sender.close_if_unused()
        wait_until_closed = time.monotonic() + 10
        while relay.open_sessions() and time.monotonic() < wait_until_closed:
            time.sleep(0.05)
        assert relay.open_sessions() == 0  # the server saw the connection end (QUIT)
        sender.close_if_unused()  # nothing open: nothing to do
        sender.send(envelope_from=USER, recipient="c@example.org", raw=raw_reply(3))
        assert sender.connections_opened == 2
    assert len(relay.accepted) == 3


def test_4xx_is_transient_and_5xx_permanent_with_reply_text(relay: LocalSmtpRelay) -> None:
    relay.fail_next(451, "4.3.0 try again later", at="DATA")
    with SmtpSender(smtp_config(relay.port)) as sender:
        with pytest.raises(TransientSendError) as transient:
            sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
        assert transient.value.code == 451 and "try again later" in str(transient.value)
        relay.fail_next(550, "5.1.1 no such user", at="RCPT")
        with pytest.raises(PermanentSendError) as permanent:
            sender.send(envelope_from=USER, recipient="nobody@example.org", raw=raw_reply())
        assert permanent.value.code == 550 and "RCPT TO: 550 5.1.1 no such user" in str(permanent.value)
        sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())  # same connection
        assert sender.connections_opened == 1
    assert len(relay.accepted) == 1


def test_server_down_is_transient() -> None:
    sender = SmtpSender(smtp_config(free_loopback_port("127.0.0.1")))
    with sender, pytest.raises(TransientSendError, match="cannot connect"):
        sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())


def test_wrong_password_is_transient_and_never_logged(relay: LocalSmtpRelay) -> None:
    config = smtp_config(relay.port)
    bad = ServerConfig(**{**config.__dict__, "password": "wrong-pw-s3cret"})
    sender = SmtpSender(bad)
    with (
        capture_logs() as logs,
        sender,
        pytest.raises(TransientSendError, match="authentication failed") as info,
    ):
        sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
    assert "s3cret" not in str(info.value) and "s3cret" not in repr(logs) and "s3cret" not in repr(bad)


def test_starttls_not_offered_fails_closed(relay: LocalSmtpRelay) -> None:
    sender = SmtpSender(smtp_config(relay.port, TlsSecurity.STARTTLS))
    with sender, pytest.raises(SmtpSecurityError, match="does not offer STARTTLS"):
        sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
    assert relay.accepted == []


def test_starttls_and_implicit_tls_verify_certificates() -> None:
    with LocalSmtpRelay(
        None, {USER: PASSWORD}, starttls=True, implicit_tls=True, auth_require_tls=True
    ) as relay:
        assert relay.ca_file is not None and relay.tls_port is not None
        for port, security in ((relay.port, TlsSecurity.STARTTLS), (relay.tls_port, TlsSecurity.SSL)):
            with SmtpSender(smtp_config(port, security, relay.ca_file)) as sender:
                sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
            # Without the test CA the certificate cannot be verified: no send, no fallback.
            with SmtpSender(smtp_config(port, security)) as sender, pytest.raises(SmtpSecurityError):
                sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
        assert len(relay.accepted) == 2


class _SilentAfterData:
    """Accepts everything but never answers the end of DATA in time."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        await asyncio.sleep(3)
        return "250 OK"


def test_no_answer_after_data_is_uncertain() -> None:
    port = free_loopback_port("127.0.0.1")
    controller = Controller(_SilentAfterData(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        config = ServerConfig(**{**smtp_config(port).__dict__, "timeout_seconds": 0.5})
        with SmtpSender(config) as sender, pytest.raises(UncertainSendError):
            sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
    finally:
        controller.stop()


@pytest.mark.parametrize(
    "greeting", [b"", b"220 ready\r\n"], ids=["says-nothing", "greets-then-says-nothing"]
)
def test_a_server_that_says_nothing_is_a_bounded_network_wait(greeting: bytes) -> None:
    """Accepted, then silence: the send fails as transient within a few timeouts, the worker's
    thread was seen waiting on the server meanwhile (so not hung), and the server is named as
    not answering."""
    seen: list[object] = []
    thread = threading.get_ident()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(WAITS.in_flight(thread))
            time.sleep(0.05)

    with silent_server(greeting) as port:
        config = ServerConfig(**{**smtp_config(port).__dict__, "timeout_seconds": 0.5})
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        with SmtpSender(config) as sender, pytest.raises(TransientSendError):
            sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
        took = time.monotonic() - started
        stop.set()
        watcher.join(5)
    endpoint = f"127.0.0.1:{port}"
    assert took < 3 * 0.5 + 1, took
    waits = [wait for wait in seen if wait is not None]
    assert waits and {(wait.service, wait.endpoint) for wait in waits} == {("smtp", endpoint)}  # type: ignore[attr-defined]
    assert ("smtp", endpoint) in {(silence.service, silence.endpoint) for silence in WAITS.silences()}


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    "failure", ["sign-in refused", "certificate not trusted", "unreadable CA file", "refused", "reset"]
)
def test_a_hundred_failed_sends_leave_no_socket_open(failure: str, tmp_path: Path) -> None:
    """Every failed connection setup closes its socket itself. The errors are kept (as a log record
    or an error tracker may keep them) and the cyclic garbage collector is off while the sends fail,
    so a socket left for the collector stays open and is counted."""
    garbage_ca = tmp_path / "ca.pem"
    garbage_ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(LocalSmtpRelay(None, {USER: PASSWORD}, starttls=True))
        config = {
            "sign-in refused": ServerConfig(**{**smtp_config(relay.port).__dict__, "password": "wrong-pw"}),
            "certificate not trusted": smtp_config(relay.port, TlsSecurity.STARTTLS),
            "unreadable CA file": smtp_config(relay.port, TlsSecurity.STARTTLS, garbage_ca),
            "refused": smtp_config(free_loopback_port("127.0.0.1")),
            "reset": smtp_config(stack.enter_context(resetting_server())),
        }[failure]
        expected = {"sign-in refused": SmtpAuthError, "certificate not trusted": SmtpSecurityError}
        kept: list[BaseException] = []
        gc.collect()
        before = _open_descriptors()
        gc.disable()
        try:
            for _ in range(100):
                sender = SmtpSender(config)
                with pytest.raises(expected.get(failure, TransientSendError)) as failed:
                    sender.send(envelope_from=USER, recipient="a@example.org", raw=raw_reply())
                sender.close()
                kept.append(failed.value)
            # The relay's end of each connection closes shortly after the client's.
            deadline = time.monotonic() + 15
            while _open_descriptors() > before and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _open_descriptors() - before <= 0
        finally:
            gc.enable()
        assert relay.accepted == []


# ------------------------------------------------------------------------- deliver_next + outbox


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def queue(engine: Engine, key: str, recipient: str) -> int:
    with engine.begin() as conn:
        row_id, _ = outbox.insert_reply(
            conn,
            account="acct",
            inbound_key=key,
            message_pk=None,
            rule_name="ack",
            action="send",
            recipient=recipient,
            reply_message_id=f"<r{key}>",
            subject="Re: x",
            raw=raw_reply(),
            now=T0,
        )
    return row_id


def test_smtp_down_then_up_delivers_once(engine: Engine, relay: LocalSmtpRelay) -> None:
    row_id = queue(engine, "<a@x>", "a@example.org")
    relay.stop()
    clock = [T0]
    with SmtpSender(smtp_config(relay.port)) as sender:

        def step():  # type: ignore[no-untyped-def]
            return deliver_next(
                engine, sender, claimer="w1", envelope_from=USER, max_attempts=5, clock=lambda: clock[0]
            )

        result = step()
        assert result is not None and result.state is OutboxState.PENDING
        assert step() is None  # backing off
        relay.start()
        clock[0] = T0 + timedelta(minutes=2)
        result = step()
        assert result is not None and result.state is OutboxState.SENT
        assert step() is None
    assert len(relay.accepted) == 1
    with engine.connect() as conn:
        row = outbox.get_reply(conn, row_id)
    assert row is not None and row.state is OutboxState.SENT and row.attempts == 2


def test_4xx_then_success_and_5xx_failed_with_reason(engine: Engine, relay: LocalSmtpRelay) -> None:
    ok_id = queue(engine, "<a@x>", "a@example.org")
    bad_id = queue(engine, "<b@x>", "b@example.org")
    relay.fail_next(421, "4.7.0 slow down", at="DATA")
    results = []
    with SmtpSender(smtp_config(relay.port)) as sender:
        for minutes in (0, 1, 5, 10):
            if minutes == 1:
                relay.fail_next(554, "5.7.1 rejected by policy", at="RCPT")
            result = deliver_next(
                engine,
                sender,
                claimer="w1",
                envelope_from=USER,
                max_attempts=5,
                clock=lambda m=minutes: T0 + timedelta(minutes=m),
            )
            if result:
                results.append((result.outbox_id, result.state))
    assert results == [(ok_id, OutboxState.PENDING), (bad_id, OutboxState.FAILED), (ok_id, OutboxState.SENT)]
    with engine.connect() as conn:
        bad = outbox.get_reply(conn, bad_id)
    assert bad is not None and bad.last_error == "RCPT TO: 554 5.7.1 rejected by policy"
    assert [a.rcpt_tos for a in relay.accepted] == [("a@example.org",)]


def test_no_answer_after_data_leaves_the_reply_unknown_and_counts_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Metrics are off in this process: what the delivery counts is recorded here.
    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(metrics, "reply_outcome", lambda rule, outcome: counted.append((rule, outcome)))
    monkeypatch.setattr(metrics, "smtp_error", lambda kind, auth=False: counted.append(("smtp", kind)))
    row_id = queue(engine, "<a@x>", "a@example.org")
    port = free_loopback_port("127.0.0.1")
    controller = Controller(_SilentAfterData(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        config = ServerConfig(**{**smtp_config(port).__dict__, "timeout_seconds": 0.5})
        with SmtpSender(config) as sender:
            result = deliver_next(
                engine, sender, claimer="w1", envelope_from=USER, max_attempts=5, clock=lambda: T0
            )
    finally:
        controller.stop()
    assert result is not None and (result.outbox_id, result.state) == (row_id, OutboxState.UNKNOWN)
    assert counted == [("ack", "unknown"), ("smtp", "uncertain")]


def test_a_send_the_database_no_longer_expects_ends_sent_and_cannot_be_retried(
    engine: Engine, relay: LocalSmtpRelay
) -> None:
    # Another host found the claim stale and marked the row unknown while our SMTP conversation was
    # still going; then the server accepted the reply. It was sent: the row must say so, the log
    # must tell what happened, and `outbox retry` must not send it a second time.
    row_id = queue(engine, "<a@x>", "a@example.org")

    class TakenOverMidSend(SmtpSender):
        def send(self, **kwargs: object) -> str:
            with engine.begin() as conn:
                assert outbox.recover_interrupted(conn, now=T0, claimers=("w1",)) == ["ack"]
            return super().send(**kwargs)  # type: ignore[arg-type]

    with TakenOverMidSend(smtp_config(relay.port)) as sender, capture_logs() as logs:
        result = deliver_next(
            engine, sender, claimer="w1", envelope_from=USER, max_attempts=5, clock=lambda: T0
        )
    assert result is not None and result.state is OutboxState.SENT
    assert len(relay.accepted) == 1
    with engine.begin() as conn:
        row = outbox.get_reply(conn, row_id)
        assert row is not None and row.state is OutboxState.SENT and row.sent_at is not None
        assert not outbox.retry_reply(conn, row_id, now=T0)
    (entry,) = [e for e in logs if e["event"].startswith("reply sent")]
    assert entry["log_level"] == "warning" and entry["previous_state"] == "unknown"


def test_reply_lands_in_dovecot(smtp_relay: LocalSmtpRelay, mail_users: dict[str, str]) -> None:
    config = ServerConfig(**{**smtp_config(smtp_relay.port).__dict__, "password": mail_users[USER]})
    with SmtpSender(config) as sender:
        sender.send(envelope_from=USER, recipient="bob@example.test", raw=raw_reply())
    (accepted,) = smtp_relay.accepted
    assert accepted.delivered_to == ("bob@example.test",)
