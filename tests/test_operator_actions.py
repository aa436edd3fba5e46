"""The operator's actions of ``emailops.actions`` on both index backends: each row changed from the
states the action applies to only, one audit entry (before, after) per row changed and none per
row refused, another account's rows left alone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, update

from emailops.actions.drafts import change_jobs
from emailops.actions.quarantine import Stage, release_quarantined, retry_quarantined
from emailops.actions.replies import Resolution, resolve_replies
from emailops.audit import Actor, list_entries
from emailops.llm import jobs
from emailops.replies import outbox
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.schema import llm_jobs, messages
from emailops.store.schema import outbox as outbox_table
from localmail.dovecot import LocalDovecot
from tests.index_helpers import ACCOUNT, index_engine, rows
from tests.test_store import NOW, fetched

OPERATOR = Actor("olga", "operator", "192.0.2.7")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = index_engine(db_url)
    yield engine
    engine.dispose()


def reply(engine: Engine, n: int, state: str, account: str = ACCOUNT) -> int:
    with engine.begin() as conn:
        row_id, _ = outbox.insert_reply(
            conn,
            account=account,
            inbound_key=f"<in-{n}@example.org>",
            message_pk=None,
            rule_name="ack",
            action="send",
            recipient=f"person{n}@example.org",
            reply_message_id=f"<reply-{n}@example.test>",
            subject="Re: q",
            raw=b"Subject: Re: q\r\n\r\nbody\r\n",
            now=NOW,
        )
        conn.execute(update(outbox_table).where(outbox_table.c.id == row_id).values(state=state))
    return row_id


def audited(engine: Engine) -> list[tuple[str, str | None, Any, Any]]:
    with engine.connect() as conn:
        entries = list_entries(conn)
    assert all((e.actor, e.role, e.source) == ("olga", "operator", "192.0.2.7") for e in entries)
    return [(e.action, e.target, e.before["state"], e.after["state"]) for e in reversed(entries)]


def test_outbox_resolutions_change_only_the_states_they_apply_to_each_audited(engine: Engine) -> None:
    unknown, failed, pending, sent = (
        reply(engine, n, s) for n, s in enumerate(("unknown", "failed", "pending", "sent"))
    )
    theirs = reply(engine, 9, "unknown", account="bob@example.test@127.0.0.1")
    now = datetime.now(UTC)

    confirmed = resolve_replies(
        engine, [unknown, pending, theirs], Resolution.SENT, account=ACCOUNT, actor=OPERATOR, now=now
    )
    assert [(c.row_id, c.done) for c in confirmed] == [(unknown, True), (pending, False), (theirs, False)]
    assert confirmed[1].refusal == "it is pending; sent applies to unknown replies"
    assert confirmed[2].refusal == f"no such reply of {ACCOUNT}"
    resent = resolve_replies(
        engine, [failed, sent], Resolution.RESEND, account=ACCOUNT, actor=OPERATOR, now=now
    )
    assert [c.done for c in resent] == [True, False]
    assert resent[1].refusal == "it is sent; resend applies to failed or unknown replies"
    cancelled = resolve_replies(
        engine, [pending], Resolution.CANCEL, account=ACCOUNT, actor=OPERATOR, now=now
    )
    assert cancelled[0].done and cancelled[0].after is not None and cancelled[0].after["state"] == "cancelled"

    assert rows(engine, "SELECT id, state FROM outbox ORDER BY id") == [
        (unknown, "sent"),
        (failed, "pending"),
        (pending, "cancelled"),
        (sent, "sent"),
        (theirs, "unknown"),
    ]
    assert audited(engine) == [
        ("outbox.resolve", f"{ACCOUNT}/outbox:{unknown}", "unknown", "sent"),
        ("outbox.resolve", f"{ACCOUNT}/outbox:{failed}", "failed", "pending"),
        ("outbox.resolve", f"{ACCOUNT}/outbox:{pending}", "pending", "cancelled"),
    ]
    with engine.connect() as conn:
        assert [e.after["as"] for e in reversed(list_entries(conn))] == ["sent", "resend", "cancel"]


def test_a_reply_confirmed_sent_is_never_claimed_again(engine: Engine) -> None:
    unknown = reply(engine, 1, "unknown")
    resolve_replies(engine, [unknown], Resolution.SENT, account=ACCOUNT, actor=OPERATOR, now=NOW)
    with engine.begin() as conn:
        assert outbox.claim_next(conn, claimer="w1", now=datetime.now(UTC)) is None
        assert outbox.retry_reply(conn, unknown, now=NOW, account=ACCOUNT) is False


def test_model_jobs_retry_and_cancel_are_audited(engine: Engine) -> None:
    with engine.begin() as conn:
        ids = [
            jobs.insert_job(
                conn,
                account=ACCOUNT,
                inbound_key=f"<q{n}@example.test>",
                message_pk=None,
                rule_name="ai",
                action="draft",
                recipient="bob@example.test",
                subject="Re: q",
                prompt="hello",
                model="tiny",
                max_tokens=10,
                temperature=None,
                now=NOW,
            )[0]
            for n in (1, 2)
        ]
        conn.execute(update(llm_jobs).where(llm_jobs.c.id == ids[0]).values(state="failed", attempts=3))
    retried = change_jobs(engine, [ids[0], ids[1]], "retry", account=ACCOUNT, actor=OPERATOR)
    assert [c.done for c in retried] == [True, False]
    assert retried[1].refusal == "it is pending; retry applies to failed jobs"
    assert change_jobs(engine, [ids[1]], "cancel", account="other", actor=OPERATOR)[0].refusal == (
        "no such model job of other"
    )
    assert change_jobs(engine, [ids[1]], "cancel", account=ACCOUNT, actor=OPERATOR)[0].done
    assert rows(engine, "SELECT state, attempts FROM llm_jobs ORDER BY id") == [
        ("pending", 0),
        ("cancelled", 0),
    ]
    assert audited(engine) == [
        ("drafts.retry", f"{ACCOUNT}/llm_job:{ids[0]}", "failed", "pending"),
        ("drafts.cancel", f"{ACCOUNT}/llm_job:{ids[1]}", "pending", "cancelled"),
    ]


def test_rules_quarantine_retry_and_release(engine: Engine) -> None:
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        pks = message_store.insert_messages(
            conn, folder.id, 1, [fetched(1), fetched(2), fetched(3)], baseline_uidnext=1, now=NOW
        )
        conn.execute(
            update(messages)
            .where(messages.c.id.in_([pks[1], pks[2]]))
            .values(rules_state="quarantined", rules_attempts=3, quarantine_reason="it raised")
        )
    retried = retry_quarantined(engine, Stage.RULES, [pks[1], pks[3]], account=ACCOUNT, actor=OPERATOR)
    assert [c.done for c in retried] == [True, False]
    assert retried[1].refusal == "its rules are pending, not quarantined"
    assert release_quarantined(engine, [pks[2]], account="other", actor=OPERATOR)[0].refusal == (
        "no indexed message of other with this id"
    )
    assert release_quarantined(engine, [pks[2]], account=ACCOUNT, actor=OPERATOR)[0].done
    assert rows(engine, "SELECT uid, rules_state, rules_attempts FROM messages ORDER BY uid") == [
        (1, "pending", 0),
        (2, "done", 3),
        (3, "pending", 0),
    ]
    assert audited(engine) == [
        ("quarantine.retry", f"{ACCOUNT}/quarantine.rules:{pks[1]}", "quarantined", "pending"),
        ("quarantine.release", f"{ACCOUNT}/quarantine.rules:{pks[2]}", "quarantined", "done"),
    ]


def test_a_message_quarantined_by_indexing_is_downloaded_then_indexed_on_retry(
    dovecot: LocalDovecot, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emailops.actions.quarantine import find_quarantined
    from emailops.imap import parsing
    from emailops.imap.raw_message import download_raw
    from emailops.imap.sync import FolderSync
    from emailops.store import index_work
    from tests.index_helpers import ALICE, message, sync_config
    from tests.test_quarantine import connect_to

    real = parsing.parse_message
    poisoned = [True]

    def failing_on_poison(raw: bytes, **kwargs: Any) -> Any:
        if b"poison" in raw and poisoned[0]:
            raise MemoryError("the parser gave up")
        return real(raw, **kwargs)

    monkeypatch.setattr(parsing, "parse_message", failing_on_poison)
    client = connect_to(dovecot)
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(client)
    poison = message(2, subject="poison", message_id="<poison@example.org>")
    for raw in (message(1), poison, message(3)):
        dovecot.deliver(ALICE, raw)
    for _ in range(10):
        try:
            sync.sync(client)
            break
        except MemoryError:
            pass
    with engine.connect() as conn:
        (entry,) = index_work.list_quarantined(conn, ACCOUNT)
        assert find_quarantined(conn, Stage.INDEX, entry.row_id, ACCOUNT) == entry
        assert find_quarantined(conn, Stage.INDEX, entry.row_id, "other") is None
    downloaded = download_raw(client, entry.folder, entry.uidvalidity, entry.uid)
    assert downloaded is not None  # as delivered: with the Return-Path and Delivered-To of delivery
    assert downloaded.replace(b"\r\n", b"\n").rstrip().endswith(poison.replace(b"\r\n", b"\n").rstrip())
    assert download_raw(client, entry.folder, entry.uidvalidity + 1, entry.uid) is None
    sync.sync(client)
    assert rows(engine, "SELECT uid FROM messages ORDER BY uid") == [(1,), (3,)]  # still set aside

    poisoned[0] = False  # the parser was fixed
    (change,) = retry_quarantined(engine, Stage.INDEX, [entry.row_id], account=ACCOUNT, actor=OPERATOR)
    assert change.done and change.before is not None and change.before["uid"] == 2
    assert retry_quarantined(engine, Stage.INDEX, [entry.row_id], account=ACCOUNT, actor=OPERATOR)[
        0
    ].refusal == (f"no message of {ACCOUNT} quarantined by indexing with this id")
    sync.sync(client)
    assert rows(engine, "SELECT uid, message_id FROM messages ORDER BY uid") == [
        (1, "<note-1@example.org>"),
        (2, "<poison@example.org>"),
        (3, "<note-3@example.org>"),
    ]
    assert rows(engine, "SELECT count(*) FROM index_quarantine") == [(0,)]
    with engine.connect() as conn:
        (audit_entry,) = list_entries(conn)
    assert (audit_entry.action, audit_entry.target) == (
        "quarantine.retry",
        f"{ACCOUNT}/quarantine.index:{entry.row_id}",
    )
