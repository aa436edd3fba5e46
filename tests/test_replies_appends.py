"""Drafts and Sent copies are saved once even when the answer to the APPEND is lost.

A real Dovecot; the worker's mailbox session goes through a proxy that forwards the APPEND and then
drops the connection instead of passing the server's answer on (the draft is saved, the worker does
not know it). Indexing and SMTP go straight to their servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from bench.imap_proxy import CountingProxy
from emailops.config import ReplyConfig, TlsSecurity
from emailops.pipeline import MailPipeline
from emailops.processes import ProcessIdentity
from emailops.replies import outbox
from emailops.replies.mailbox import MailboxSession
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage, RulesStage
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, sync_config
from tests.test_replies_e2e import inbound


def rules(*, draft: bool) -> str:
    return f"""
[[rules]]
name = "support-ack"
[rules.match]
subject = "help"
[rules.reply]
template = "Hello {{sender_name}}, we received your message."
draft = {"true" if draft else "false"}
"""


class Worker:
    """Alice's pipeline stepped in this process, its mailbox session through ``proxy``."""

    def __init__(
        self,
        dovecot: LocalDovecot,
        relay: LocalSmtpRelay,
        proxy: CountingProxy,
        db_url: str,
        rules_file: Path,
        **reply: Any,
    ) -> None:
        self.engine: Engine = index_engine(db_url)
        config = ReplyConfig(from_address=ALICE, own_addresses=(ALICE,), rules_file=rules_file, **reply)
        owner = str(ProcessIdentity.of_this_process(1, run="test"))
        self.mailbox = MailboxSession(imap_config(dovecot, host=proxy.host, port=proxy.port))
        smtp = imap_config(dovecot, port=relay.port, security=TlsSecurity.NONE)
        self.pipeline = MailPipeline(
            self.engine,
            imap_config(dovecot),
            sync_config(poll_interval_seconds=300),
            owner=owner,
            stages=[
                RulesStage(self.engine, account=ACCOUNT, config=config, mailbox=self.mailbox),
                OutboxStage(
                    self.engine,
                    account=ACCOUNT,
                    claimer=owner,
                    config=config,
                    sender=SmtpSender(smtp),
                    mailbox=self.mailbox,
                ),
            ],
            step_seconds=0.2,
        )

    def run_until(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "condition not reached in time"
            self.pipeline.run_once()

    def replies(self) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            found = conn.execute(text("SELECT id, state, attempts, last_error FROM outbox")).all()
            return [tuple(r) for r in found]

    def make_due(self) -> None:
        """The backoff of a pending reply is over (instead of waiting a minute)."""
        with self.engine.begin() as conn:
            conn.execute(
                text("UPDATE outbox SET next_attempt_at = :now WHERE state = 'pending'"),
                {"now": datetime(2000, 1, 1, tzinfo=UTC)},
            )

    def close(self) -> None:
        self.pipeline.close()


def in_folder(dovecot: LocalDovecot, folder: str) -> list[int]:
    with dovecot.imap(ALICE) as client:
        client.select_folder(folder, readonly=True)
        return list(client.search(["ALL"]))


@pytest.fixture
def proxy(dovecot: LocalDovecot) -> Iterator[CountingProxy]:
    with CountingProxy(dovecot.host, dovecot.imap_port) as running:
        yield running


def start(
    dovecot: LocalDovecot,
    relay: LocalSmtpRelay,
    proxy: CountingProxy,
    db_url: str,
    tmp_path: Path,
    *,
    draft: bool,
    **reply: Any,
) -> Worker:
    for folder in ("Drafts", "Sent"):
        dovecot.create_folder(ALICE, folder)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(rules(draft=draft))
    worker = Worker(dovecot, relay, proxy, db_url, rules_file, **reply)
    worker.run_until(lambda: any(w.idling for w in worker.pipeline.watchers.values()))
    return worker


def appends_sent(proxy: CountingProxy) -> int:
    return sum(session.count("APPEND") for session in proxy.sessions())


def test_a_draft_whose_append_answer_was_lost_is_found_in_the_folder_and_not_saved_again(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, proxy: CountingProxy, db_url: str, tmp_path: Path
) -> None:
    worker = start(dovecot, smtp_relay, proxy, db_url, tmp_path, draft=True)
    try:
        proxy.lose_answer_to("APPEND")
        dovecot.deliver(ALICE, inbound("help please"))
        with capture_logs() as logs:
            worker.run_until(lambda: appends_sent(proxy) == 1 and worker.replies()[0][1] != "sending")
            # Had the lost answer been taken for a failure, the draft would be due again now.
            worker.make_due()
            for _ in range(5):
                worker.pipeline.run_once()
    finally:
        worker.close()
    assert len(in_folder(dovecot, "Drafts")) == 1
    assert appends_sent(proxy) == 1
    [(_id, state, attempts, _error)] = worker.replies()
    assert (state, attempts) == ("sent", 1)
    (saved,) = [e for e in logs if e["event"] == "reply saved as a draft"]
    assert saved["found_in_folder"] is True


def test_a_draft_whose_outcome_stays_unknown_is_searched_for_before_the_retry_saves_it(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, proxy: CountingProxy, db_url: str, tmp_path: Path
) -> None:
    # The answer is lost and the server cannot be reached to look: the draft is unknown, never
    # saved again on its own. The operator's retry finds it in the folder.
    worker = start(dovecot, smtp_relay, proxy, db_url, tmp_path, draft=True)
    try:
        worker.mailbox.client()  # the session's connection is open: only new ones are refused
        proxy.refusing = True
        proxy.lose_answer_to("APPEND")
        dovecot.deliver(ALICE, inbound("help please"))
        with capture_logs() as logs:
            worker.run_until(lambda: [r[1] for r in worker.replies()] == ["unknown"])
        [(reply_id, _state, _attempts, error)] = worker.replies()
        assert "answer to APPEND was lost" in error
        (warning,) = [e for e in logs if e["event"].startswith("draft may or may not be saved")]
        assert warning["outbox_id"] == reply_id
        assert len(in_folder(dovecot, "Drafts")) == 1  # the server did save it

        proxy.refusing = False
        with worker.engine.begin() as conn:
            assert outbox.retry_reply(conn, reply_id, now=datetime.now(UTC))
        with capture_logs() as logs:
            worker.run_until(lambda: [r[1] for r in worker.replies()] == ["sent"])
    finally:
        worker.close()
    assert len(in_folder(dovecot, "Drafts")) == 1
    assert appends_sent(proxy) == 1
    (saved,) = [e for e in logs if e["event"] == "reply saved as a draft"]
    assert saved["found_in_folder"] is True


@pytest.mark.parametrize("reachable", [True, False], ids=["searched", "unreachable"])
def test_a_sent_copy_whose_append_answer_was_lost_is_told_apart_from_a_failure(
    dovecot: LocalDovecot,
    smtp_relay: LocalSmtpRelay,
    proxy: CountingProxy,
    db_url: str,
    tmp_path: Path,
    reachable: bool,
) -> None:
    worker = start(dovecot, smtp_relay, proxy, db_url, tmp_path, draft=False, save_sent_copy=True)
    try:
        worker.mailbox.client()
        proxy.refusing = not reachable
        proxy.lose_answer_to("APPEND")
        dovecot.deliver(ALICE, inbound("help please"))
        with capture_logs() as logs:
            worker.run_until(lambda: any(e["event"].startswith("copy of a sent reply") for e in logs))
    finally:
        worker.close()
    assert len(smtp_relay.accepted) == 1
    assert len(in_folder(dovecot, "Sent")) == 1
    assert appends_sent(proxy) == 1
    (told,) = [e for e in logs if e["event"].startswith("copy of a sent reply")]
    if reachable:
        assert told["event"] == "copy of a sent reply saved in the Sent folder"
        assert told["found_in_folder"] is True
    else:
        assert told["event"].startswith("copy of a sent reply may or may not be in the Sent folder")
        assert "answer to APPEND was lost" in told["error"]
