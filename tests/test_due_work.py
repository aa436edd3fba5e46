"""A worker's look at which accounts have work due (``DueWork``), on SQLite and PostgreSQL: the
stages of N idle accounts cost the same few statements per loop iteration whatever N; work that
another process records for one account (a message pending for its rules, a reply due, a model
job) is taken up in the next iteration; the claims of a dead worker are taken back for every
account in one pass."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from emailops.config import LlmConfig, ReplyConfig, ServerConfig, TlsSecurity
from emailops.llm import jobs
from emailops.llm.client import ChatClient
from emailops.pipeline import AfterIndexStage
from emailops.processes import ProcessIdentity
from emailops.replies import outbox
from emailops.replies.due_work import DueWork
from emailops.replies.llm_stage import LlmStage
from emailops.replies.mailbox import MailboxSession
from emailops.replies.put_off import PutOffChanges
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage, RulesStage
from emailops.store import folders as folder_store
from emailops.store import mailbox_changes, rules_work
from emailops.store import messages as message_store
from emailops.store.database import create_index_engine
from emailops.store.schema import llm_jobs, messages
from emailops.store.schema import outbox as outbox_table
from tests.index_helpers import index_engine
from tests.test_replies_e2e import RULES
from tests.test_store import NOW, fetched

# Nothing listens there: a send or a model call fails at once (and is retried later).
NOWHERE = ServerConfig(
    host="127.0.0.1", port=9, username="u", password="x", security=TlsSecurity.NONE, timeout_seconds=1
)
CONFIG = ReplyConfig(
    from_address="me@example.test", llm=LlmConfig(base_url="http://127.0.0.1:9/v1", timeout_seconds=1)
)
CLAIMER = str(ProcessIdentity(socket.gethostname(), "run-now", 1, 1))


def account(n: int) -> str:
    return f"user{n}@example.test@127.0.0.1"


class Worker:
    """The after-index stages of ``accounts`` accounts as ``prod.mail_worker`` builds them: the
    rules, the model and the outbox of each, sharing one ``DueWork`` that comes first."""

    def __init__(self, engine: Engine, accounts: int, config: ReplyConfig = CONFIG) -> None:
        self.due = DueWork(engine, config=config, claimer=CLAIMER)
        self.stages: list[AfterIndexStage] = [self.due]
        for n in range(accounts):
            mailbox = MailboxSession(NOWHERE)
            common: dict[str, Any] = {"account": account(n), "claimer": CLAIMER, "config": config}
            self.stages += [
                RulesStage(engine, mailbox=mailbox, check_move_folders=False, due=self.due, **common),
                LlmStage(
                    engine, client=ChatClient(CONFIG.llm.base_url, timeout_seconds=1), due=self.due, **common
                ),  # type: ignore[union-attr]
                OutboxStage(engine, sender=SmtpSender(NOWHERE), mailbox=mailbox, due=self.due, **common),
            ]

    def iteration(self) -> bool:
        """What ``MailPipeline.run_once`` does with its stages."""
        return any([stage.run_once() for stage in self.stages])

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = index_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def other(db_url: str) -> Iterator[Engine]:
    """Another worker's (or container's) connection to the same index."""
    engine = create_index_engine(db_url)
    yield engine
    engine.dispose()


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements sent on ``engine`` meanwhile."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def idle_statements(engine: Engine, accounts: int) -> tuple[int, int]:
    """Statements of an idle worker's first iteration (claims recovered) and of its next one."""
    worker = Worker(engine, accounts)
    try:
        with statements(engine) as first:
            assert worker.iteration() is False
        with statements(engine) as next_one:
            assert worker.iteration() is False
    finally:
        worker.close()
    return len(first), len(next_one)


def test_an_idle_worker_sends_as_many_statements_per_iteration_for_50_accounts_as_for_one(
    engine: Engine,
) -> None:
    one = idle_statements(engine, 1)
    fifty = idle_statements(engine, 50)
    assert fifty == one
    # Four queries; SQLite begins its read transaction with a statement of its own.
    assert one[1] <= 5


def record_rules_work(engine: Engine, name: str, subject: str = "") -> None:
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, name, "INBOX")
        message = fetched(1, subject=subject)
        message_store.insert_messages(conn, folder.id, 1, [message], baseline_uidnext=1, now=NOW)


def record_outbox_work(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        outbox.insert_reply(
            conn,
            account=name,
            inbound_key="<in@x>",
            message_pk=None,
            rule_name="ack",
            action="send",
            recipient="bob@example.test",
            reply_message_id="<out@x>",
            subject="Re: hi",
            raw=b"Subject: Re: hi\r\n\r\nbody\r\n",
            now=datetime.now(UTC),
        )


def record_llm_work(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        jobs.insert_job(
            conn,
            account=name,
            inbound_key="<in@x>",
            message_pk=None,
            rule_name="ai",
            action="send",
            recipient="bob@example.test",
            subject="Re: hi",
            prompt="hello",
            model="tiny",
            max_tokens=10,
            temperature=None,
            now=datetime.now(UTC),
        )


def taken_up(engine: Engine, kind: str) -> bool:
    """Whether the worker took the one piece of work up: the rules decided the message; the send,
    or the model call, was tried (and failed: nothing listens, so it waits for its retry)."""
    query = {
        "rules": select(messages.c.rules_state == "done"),
        "outbox": select(outbox_table.c.attempts == 1),
        "llm": select(llm_jobs.c.attempts == 1),
    }[kind]
    with engine.connect() as conn:
        return bool(conn.execute(query).scalar_one())


RECORD = {"rules": record_rules_work, "outbox": record_outbox_work, "llm": record_llm_work}


@pytest.mark.parametrize("kind", ["rules", "outbox", "llm"])
def test_work_another_worker_records_for_one_account_is_taken_up_in_the_next_iteration(
    engine: Engine, other: Engine, kind: str
) -> None:
    worker = Worker(engine, 50)
    try:
        assert worker.iteration() is False
        RECORD[kind](other, account(37))
        assert worker.iteration() is True
        assert taken_up(engine, kind)
    finally:
        worker.close()


def test_a_dead_workers_claims_of_every_account_are_taken_back_in_one_pass(engine: Engine) -> None:
    dead = str(ProcessIdentity(socket.gethostname(), "run-before", 4242, 1))
    for n in (3, 41):
        record_rules_work(engine, account(n))
        record_outbox_work(engine, account(n))
    with engine.begin() as conn:
        for pk in conn.execute(select(messages.c.id)).scalars():
            assert rules_work.claim(conn, pk, dead) == 1
        for n in (3, 41):
            assert outbox.claim_next(conn, claimer=dead, now=datetime.now(UTC), account=account(n))
    due = DueWork(engine, config=CONFIG, claimer=CLAIMER, dead_runs=("run-before",))
    assert due.run_once() is False
    with engine.connect() as conn:
        assert set(conn.execute(select(messages.c.rules_state)).scalars()) == {"pending"}
        assert set(conn.execute(select(outbox_table.c.state)).scalars()) == {"unknown"}
    assert due.rules_due(account(3)) and due.rules_due(account(41)) and not due.rules_due(account(4))


def test_a_reply_the_rules_queue_is_sent_in_the_same_iteration(engine: Engine, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    worker = Worker(engine, 50, replace(CONFIG, rules_file=rules))
    try:
        assert worker.iteration() is False
        record_rules_work(engine, account(12), subject="help")
        assert worker.iteration() is True
        assert taken_up(engine, "rules")
        assert taken_up(engine, "outbox")
    finally:
        worker.close()


def test_sqlite_finds_due_work_through_indexes_alone(tmp_path: Path) -> None:
    """Without statistics (the daemon runs no ANALYZE) no query of the look reads a whole table."""
    engine = index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        sent.append((statement, parameters))

    due = DueWork(engine, config=CONFIG, claimer=CLAIMER)
    event.listen(engine, "before_cursor_execute", record)
    try:
        assert not due.rules_due(account(1))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    queries = [(statement, parameters) for statement, parameters in sent if statement.startswith("SELECT")]
    assert len(queries) == 4
    with engine.connect() as conn:
        for statement, parameters in queries:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            assert not [step for step in plan if step.startswith("SCAN")], (statement, plan)
    engine.dispose()


def test_a_mailbox_change_put_off_by_another_worker_is_due_once_its_time_came(
    engine: Engine, other: Engine
) -> None:
    # A change that found no IMAP slot is made by whichever worker serves the account: the look
    # of every iteration says so once it is due (no query per account and stage meanwhile).
    due = DueWork(engine, config=CONFIG, claimer=CLAIMER)
    with other.begin() as conn:
        mailbox_changes.put_off(conn, account=account(1), delay=timedelta(hours=1), actions=[("flag", None)])
        mailbox_changes.put_off(conn, account=account(2), delay=timedelta(0), actions=[("flag", None)])
    due.run_once()
    assert not due.put_off_due(account(1))
    assert due.put_off_due(account(2))
    # The stage of the account with nothing due asks nothing.
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    assert PutOffChanges(engine, account(1), "message", due=due).take_due() == []
    assert sent == []
