"""The reply history stays bounded (replies.history): old replies' text and prompts are emptied in
batches once a day, the rows stay, and a message whose reply was purged is still answered once.

Runs on SQLite and PostgreSQL (``db_url``); the index is made by the migrations, 12 included.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, select, text, update

from emailops.config import LlmConfig
from emailops.llm import jobs
from emailops.replies import outbox
from emailops.replies.decisions import Decision, apply_rules
from emailops.replies.history import PURGE_INTERVAL_SECONDS, HistoryPurgeStage, purge_batch
from emailops.rules import RuleSet, load_rules
from emailops.store.database import create_index_engine
from emailops.store.migrations import MIGRATIONS, migrate
from emailops.store.schema import llm_jobs as jobs_table
from emailops.store.schema import outbox as outbox_table
from localmail.dovecot import LocalDovecot
from prod.mail_worker import create_unit
from prod.runtime_settings import ConfigError, RuntimeSettings
from tests.index_helpers import ALICE, daemon_env, index_engine
from tests.reply_factories import parsed_message, reply_config

T0 = datetime(2024, 5, 6, 8, 0, 0, tzinfo=UTC)
ACCOUNT = "me@example.net@imap.example.net"
RAW = b"Subject: Re: hi\r\n\r\nthe reply's text\r\n"
ACK_RULE = """
[[rules]]
name = "ack"
[rules.match]
subject = "help"
[rules.reply]
template = "Hello {sender_name}, we got your message."
once_per_sender_days = 7
"""
RULES = (
    ACK_RULE
    + """
[[rules]]
name = "model-draft"
[rules.match]
subject = "help"
[rules.reply]
llm_prompt = "Answer {sender_name}: {body}"
"""
)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_index_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    path = tmp_path / "rules.toml"
    path.write_text(RULES, encoding="utf-8")
    return load_rules(path)


def add_reply(engine: Engine, key: str, *, created: datetime, state: str = "sent") -> int:
    with engine.begin() as conn:
        row_id, _ = outbox.insert_reply(
            conn,
            account=ACCOUNT,
            inbound_key=key,
            message_pk=None,
            rule_name="ack",
            action="send",
            recipient="alice@example.org",
            reply_message_id=f"<autoreply.{key.strip('<>')}@example.net>",
            subject="Re: hi",
            raw=RAW,
            now=created,
        )
        conn.execute(update(outbox_table).where(outbox_table.c.id == row_id).values(state=state))
    return row_id


def add_job(engine: Engine, key: str, *, created: datetime, state: str = "done") -> int:
    with engine.begin() as conn:
        job_id, _ = jobs.insert_job(
            conn,
            account=ACCOUNT,
            inbound_key=key,
            message_pk=None,
            rule_name="model-draft",
            action="draft",
            recipient="alice@example.org",
            subject=None,
            prompt="Answer Alice: my order 42 did not arrive",
            model="m",
            max_tokens=800,
            temperature=None,
            now=created,
        )
        conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(state=state))
    return job_id


def contents(engine: Engine) -> dict[str, Any]:
    """Each row's kept text and purge time, by table and id."""
    with engine.connect() as conn:
        replies = conn.execute(select(outbox_table.c.id, outbox_table.c.raw, outbox_table.c.purged_at))
        prompts = conn.execute(select(jobs_table.c.id, jobs_table.c.prompt, jobs_table.c.purged_at))
        return {
            "outbox": {row_id: (bytes(raw), purged is not None) for row_id, raw, purged in replies},
            "llm_jobs": {row_id: (prompt, purged is not None) for row_id, prompt, purged in prompts},
        }


def test_purge_empties_finished_rows_older_than_the_limit_in_batches_and_keeps_the_rest(
    engine: Engine,
) -> None:
    now = T0 + timedelta(days=200)
    old = now - timedelta(days=91)
    oldest = [add_reply(engine, f"<old-{n}@x>", created=old - timedelta(hours=n)) for n in range(3)]
    cancelled = add_reply(engine, "<old-cancelled@x>", created=old, state="cancelled")
    unfinished = add_reply(engine, "<old-pending@x>", created=old, state="pending")
    young = add_reply(engine, "<young@x>", created=now - timedelta(days=89))
    old_job = add_job(engine, "<old-job@x>", created=old)
    working_job = add_job(engine, "<old-working@x>", created=old, state="working")
    young_job = add_job(engine, "<young-job@x>", created=now - timedelta(days=89))
    cutoff = now - timedelta(days=90)

    with engine.begin() as conn:
        assert purge_batch(conn, older_than=cutoff, now=now, limit=2) == 3  # 2 replies, 1 job
    after_first = contents(engine)
    # Oldest first: the two oldest replies, nothing else of the outbox yet.
    assert after_first["outbox"][oldest[2]] == (b"", True)
    assert after_first["outbox"][oldest[1]] == (b"", True)
    assert after_first["outbox"][oldest[0]] == (RAW, False)
    assert after_first["outbox"][cancelled] == (RAW, False)

    with engine.begin() as conn:
        assert purge_batch(conn, older_than=cutoff, now=now, limit=2) == 2
    with engine.begin() as conn:
        assert purge_batch(conn, older_than=cutoff, now=now, limit=2) == 0

    final = contents(engine)
    assert final["outbox"] == {
        oldest[0]: (b"", True),
        oldest[1]: (b"", True),
        oldest[2]: (b"", True),
        cancelled: (b"", True),
        unfinished: (RAW, False),  # not finished: it is still to be sent
        young: (RAW, False),
    }
    assert final["llm_jobs"] == {
        old_job: ("", True),
        working_job: ("Answer Alice: my order 42 did not arrive", False),
        young_job: ("Answer Alice: my order 42 did not arrive", False),
    }
    # The rest of a purged row stays: what the limits count and the unique key.
    with engine.connect() as conn:
        kept = outbox.get_reply(conn, oldest[0])
    assert kept is not None
    assert (kept.inbound_key, kept.rule_name, kept.recipient, kept.state, kept.created_at) == (
        "<old-0@x>",
        "ack",
        "alice@example.org",
        outbox.OutboxState.SENT,
        old,
    )


def test_a_purged_reply_or_job_cannot_be_retried(engine: Engine) -> None:
    now = T0 + timedelta(days=200)
    purged_reply = add_reply(engine, "<old@x>", created=now - timedelta(days=91), state="failed")
    kept_reply = add_reply(engine, "<young@x>", created=now - timedelta(days=1), state="failed")
    purged_job = add_job(engine, "<old-job@x>", created=now - timedelta(days=91), state="failed")
    kept_job = add_job(engine, "<young-job@x>", created=now - timedelta(days=1), state="failed")
    with engine.begin() as conn:
        assert purge_batch(conn, older_than=now - timedelta(days=90), now=now) == 2
    with engine.begin() as conn:
        assert not outbox.retry_reply(conn, purged_reply, now=now)  # an empty reply is never sent
        assert outbox.retry_reply(conn, kept_reply, now=now)
        assert not jobs.retry_job(conn, purged_job, account=ACCOUNT)
        assert jobs.retry_job(conn, kept_job, account=ACCOUNT)


def decide(engine: Engine, rules: RuleSet, *, uid: int, now: datetime, **parsed: Any) -> list[Decision]:
    llm = LlmConfig(base_url="http://127.0.0.1:9/v1", model="m")
    with engine.begin() as conn:
        return apply_rules(
            conn,
            account=ACCOUNT,
            message_pk=None,
            folder="INBOX",
            uidvalidity=7,
            uid=uid,
            parsed=parsed_message(**parsed),
            rules=rules,
            config=reply_config(llm=llm),
            now=now,
        )


def test_a_message_whose_reply_was_purged_is_still_never_answered_twice(
    engine: Engine, rules: RuleSet
) -> None:
    first = decide(engine, rules, uid=1, now=T0)
    assert [(d.rule, d.created) for d in first] == [("ack", True), ("model-draft", True)]
    reply_id, job_id = first[0].outbox_id, first[1].llm_job_id
    with engine.begin() as conn:
        conn.execute(update(outbox_table).values(state="sent"))
        conn.execute(update(jobs_table).values(state="done"))

    later = T0 + timedelta(days=91)
    stage = HistoryPurgeStage(engine, history_days=90, clock=lambda: later)
    stage.run_once()

    # The same message again, 91 days on (a copy delivered again, or moved into another watched
    # folder: a new UID, the same Message-ID). once_per_sender_days (7) no longer holds it back:
    # only the purged rows do.
    again = decide(engine, rules, uid=2, now=later)
    assert [(d.rule, d.created, d.suppressed) for d in again] == [
        ("ack", False, None),
        ("model-draft", False, None),
    ]
    assert (again[0].outbox_id, again[1].llm_job_id) == (reply_id, job_id)
    assert contents(engine) == {"outbox": {reply_id: (b"", True)}, "llm_jobs": {job_id: ("", True)}}
    # A new message of the same sender is answered that day: nothing else stood in the way.
    other = decide(engine, rules, uid=3, now=later, message_id="<m2@example.org>")
    assert [(d.rule, d.created) for d in other] == [("ack", True), ("model-draft", True)]
    with engine.connect() as conn:
        keys = conn.execute(select(outbox_table.c.inbound_key)).scalars().all()
        job_keys = conn.execute(select(jobs_table.c.inbound_key)).scalars().all()
    assert sorted(keys) == ["<m1@example.org>", "<m2@example.org>"]
    assert sorted(job_keys) == ["<m1@example.org>", "<m2@example.org>"]


class Clocks:
    """The stage's two clocks, moved by the test: monotonic seconds and the wall clock."""

    def __init__(self) -> None:
        self.seconds = 1_000.0
        self.wall = T0 + timedelta(days=200)
        self.tick = 0.0  # added to the monotonic clock at each reading

    def monotonic(self) -> float:
        self.seconds += self.tick
        return self.seconds

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.seconds += seconds
        self.wall += timedelta(seconds=seconds)


def test_the_purge_runs_at_start_then_once_a_day(engine: Engine) -> None:
    clocks = Clocks()
    stage = HistoryPurgeStage(engine, history_days=90, clock=clocks.now, monotonic=clocks.monotonic, batch=2)
    first = [add_reply(engine, f"<a-{n}@x>", created=clocks.wall - timedelta(days=91)) for n in range(3)]
    # Each reading of the monotonic clock takes 0.3 s: a call's 1 s budget holds a few batches.
    clocks.tick = 0.3
    while stage.run_once():
        pass
    assert all(contents(engine)["outbox"][row] == (b"", True) for row in first)

    # Replies that come of age an hour later wait for the next day's purge.
    clocks.tick = 0.0
    later = add_reply(engine, "<b@x>", created=clocks.wall - timedelta(days=90) + timedelta(minutes=30))
    clocks.advance(3600)
    assert stage.run_once() is False
    clocks.advance(PURGE_INTERVAL_SECONDS - 3600 - 1)
    assert stage.run_once() is False
    assert contents(engine)["outbox"][later] == (RAW, False)
    clocks.advance(1)
    stage.run_once()
    assert contents(engine)["outbox"][later] == (b"", True)


def test_a_call_does_at_most_its_budget_of_batches(engine: Engine) -> None:
    clocks = Clocks()
    clocks.tick = 0.4  # the start reading, then one per batch: 0.4 and 0.8 are within 1 s, 1.2 is not
    stage = HistoryPurgeStage(engine, history_days=90, clock=clocks.now, monotonic=clocks.monotonic, batch=1)
    for n in range(5):
        add_reply(engine, f"<a-{n}@x>", created=clocks.wall - timedelta(days=91 + n))
    assert stage.run_once() is True
    assert sum(purged for _, purged in contents(engine)["outbox"].values()) == 2
    while stage.run_once():
        pass
    assert sum(purged for _, purged in contents(engine)["outbox"].values()) == 5


def worker_settings(tmp_path: Path, **values: Any) -> RuntimeSettings:
    return RuntimeSettings.from_env(
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        index_db_url=f"sqlite:///{tmp_path / 'emailops.db'}",
        email_imap_host="127.0.0.1",
        email_imap_port=1143,
        email_smtp_host="127.0.0.1",
        email_smtp_port=1025,
        email_username="me@example.net",
        email_password="test-password",
        log_file_enabled=False,
        **values,
    )


def test_every_worker_purges_with_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("REPLY_HISTORY_DAYS", raising=False)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(ACK_RULE)
    assert worker_settings(tmp_path, rules_file=rules_file).reply_history_days == 90
    monkeypatch.setenv("REPLY_HISTORY_DAYS", "30")
    settings = worker_settings(tmp_path, rules_file=rules_file)
    unit = create_unit(settings, 1)
    try:
        (purge,) = [stage for stage in unit.stages if isinstance(stage, HistoryPurgeStage)]
        assert purge.history == timedelta(days=30)
        assert purge.engine is unit.engine
    finally:
        unit.close()
    monkeypatch.setenv("REPLY_HISTORY_DAYS", "0")
    with pytest.raises(ConfigError, match="REPLY_HISTORY_DAYS"):
        worker_settings(tmp_path, rules_file=rules_file)


def test_reply_history_days_is_documented_with_its_default() -> None:
    repo = Path(__file__).resolve().parent.parent
    rows = [
        line
        for line in (repo / "README.md").read_text().splitlines()
        if line.startswith("| `REPLY_HISTORY_DAYS` |")
    ]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "`90`"
    example = (repo / ".env.example").read_text().splitlines()
    assert [line for line in example if line.startswith("REPLY_HISTORY_DAYS=")] == ["REPLY_HISTORY_DAYS=90"]
    assert RuntimeSettings.model_fields["reply_history_days"].default == 90


def test_an_index_of_version_10_is_migrated_with_its_replies_kept(engine: Engine) -> None:
    reply = add_reply(engine, "<before@x>", created=T0)
    with engine.begin() as conn:  # back to version 10: no purged_at, the per-sender index on recipient
        for table in ("outbox", "llm_jobs"):
            for index in ("account_recipient_created", "account_created", "unpurged_created"):
                conn.exec_driver_sql(f"DROP INDEX ix_{table}_{index}")
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN purged_at")
            former = f"CREATE INDEX ix_{table}_recipient_created ON {table} (recipient, created_at)"
            conn.exec_driver_sql(former)
        conn.exec_driver_sql("DELETE FROM schema_migrations WHERE version > 10")

    assert [m.version for m in migrate(engine)] == [m.version for m in MIGRATIONS if m.version > 10]
    schema = inspect(engine)
    for table in ("outbox", "llm_jobs"):
        assert "purged_at" in {column["name"] for column in schema.get_columns(table)}
        assert {index["name"] for index in schema.get_indexes(table)} >= {
            f"ix_{table}_account_recipient_created",
            f"ix_{table}_account_created",
            f"ix_{table}_unpurged_created",
        }
        assert f"ix_{table}_recipient_created" not in {index["name"] for index in schema.get_indexes(table)}
    assert contents(engine)["outbox"] == {reply: (RAW, False)}


@pytest.mark.postgres
def test_two_workers_purging_at_once_take_different_rows(pg_url: str) -> None:
    engine = create_index_engine(pg_url)
    migrate(engine)
    now = T0 + timedelta(days=200)
    rows = [add_reply(engine, f"<old-{n}@x>", created=now - timedelta(days=91 + n)) for n in range(4)]
    cutoff = now - timedelta(days=90)
    with engine.connect() as first, engine.connect() as second:
        first_batch, second_batch = first.begin(), second.begin()
        assert purge_batch(first, older_than=cutoff, now=now, limit=2) == 2
        # The first worker's rows are locked until it commits: the second takes the next ones at once.
        second.execute(text("SET LOCAL lock_timeout = '2s'"))
        assert purge_batch(second, older_than=cutoff, now=now, limit=2) == 2
        first_batch.commit()
        second_batch.commit()
    assert contents(engine)["outbox"] == {row: (b"", True) for row in rows}
    engine.dispose()


def test_the_operator_is_told_why_a_purged_reply_is_not_retried(
    dovecot: LocalDovecot, tmp_path: Path
) -> None:
    env = daemon_env(dovecot, tmp_path)
    engine = index_engine(env["INDEX_DB_URL"])
    created = datetime.now(UTC) - timedelta(days=91)
    with engine.begin() as conn:
        old, young = (
            outbox.insert_reply(
                conn,
                account=f"{ALICE}@127.0.0.1",
                inbound_key=f"<in-{n}@example.org>",
                message_pk=None,
                rule_name="ack",
                action="send",
                recipient="person@example.org",
                reply_message_id=f"<reply-{n}@example.test>",
                subject="Re: question",
                raw=RAW,
                now=created + timedelta(days=n),
            )[0]
            for n in (0, 90)
        )
        conn.execute(update(outbox_table).values(state="failed", last_error="550 no such user"))
        purge_batch(conn, older_than=datetime.now(UTC) - timedelta(days=90), now=datetime.now(UTC))
    engine.dispose()

    def emailops(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "emailops", *args],
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = emailops("outbox", "retry", str(old), str(young))
    assert refused.returncode == 1
    told = [line for line in refused.stderr.splitlines() if not line.startswith("{")]  # not log lines
    assert told == [
        f"not changed: reply {old}: its text was purged (REPLY_HISTORY_DAYS); there is nothing to send"
    ]
    assert '"action":"outbox.resolve"' in refused.stderr  # the audit line of the reply retried
    assert f"retry: reply {young}" in refused.stdout
