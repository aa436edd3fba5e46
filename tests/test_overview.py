"""The operator's overview on both index backends: folders with their watch mode and current
error, what waits for the operator, and the last 24 hours hour by hour."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from emailops.imap.watcher import FolderStatus
from emailops.overview import overview
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.schema import index_quarantine, llm_jobs, messages
from emailops.store.schema import outbox as outbox_table
from tests.index_helpers import ACCOUNT, index_engine
from tests.test_operator_actions import reply
from tests.test_store import fetched

NOW = datetime(2026, 1, 5, 12, 30, tzinfo=UTC)


def test_the_overview_counts_what_waits_and_the_last_day_by_hour(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        inbox = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        folder_store.ensure_folder(conn, ACCOUNT, "Archive")
        folder_store.save_sync_state(conn, inbox.id, uidvalidity=1, uidnext=10, highestmodseq=None, now=NOW)
        # Indexed now (the hour under way), 3 hours ago twice, 23 hours ago, and 25 hours ago (out).
        for uid, ago in ((1, 0), (2, 3), (3, 3), (4, 23), (5, 25)):
            message_store.insert_messages(
                conn, inbox.id, 1, [fetched(uid)], baseline_uidnext=1, now=NOW - timedelta(hours=ago)
            )
        conn.execute(update(messages).where(messages.c.uid == 2).values(rules_state="quarantined"))
        conn.execute(
            index_quarantine.insert().values(
                folder_id=inbox.id, uidvalidity=1, uid=9, attempts=3, reason="x", quarantined_at=NOW
            )
        )
        folder_store.request_fetch(conn, ACCOUNT, "Archive")
    for n, state in enumerate(("unknown", "unknown", "sent", "sent", "pending")):
        reply(engine, n, state)
    with engine.begin() as conn:
        conn.execute(
            update(outbox_table)
            .where(outbox_table.c.state == "sent")
            .values(sent_at=NOW - timedelta(hours=1))
        )
        conn.execute(
            update(outbox_table).where(outbox_table.c.id == 4).values(sent_at=NOW - timedelta(hours=30))
        )
    error_at = NOW.timestamp() - 10
    watching = [
        FolderStatus(
            "INBOX", NOW.timestamp() - 60, "transient", "BYE: server restarting\nat line 2", error_at, "idle"
        ),
        FolderStatus("Archive", NOW.timestamp(), "transient", "an old error", error_at, "polling"),
    ]
    with engine.connect() as conn:
        seen = overview(conn, watching=watching, now=NOW)
    by_name = {f.folder: f for f in seen.folders}
    inbox_row, archive = by_name["INBOX"], by_name["Archive"]
    assert (inbox_row.account, inbox_row.messages, inbox_row.mode) == (ACCOUNT, 5, "idle")
    assert inbox_row.error == "BYE: server restarting\nat line 2"  # in full
    assert inbox_row.error_at == datetime.fromtimestamp(error_at, UTC)
    assert inbox_row.last_sync_at == NOW and inbox_row.fetch_requested_at is None
    assert (archive.mode, archive.error, archive.messages) == ("polling", None, 0)  # synced since the error
    assert archive.fetch_requested_at is not None
    assert (seen.outbox_unknown, seen.quarantined) == (2, 2)
    assert seen.indexed_per_hour == [1] + [0] * 19 + [2, 0, 0, 1]
    assert seen.replies_sent_per_hour == [0] * 22 + [1, 0]
    with engine.begin() as conn:
        conn.execute(
            llm_jobs.insert(),
            [
                {
                    "account": ACCOUNT, "inbound_key": f"<j{n}@x>", "rule_name": "ai", "action": "draft",
                    "recipient": "b@x", "prompt": "p", "model": "m", "max_tokens": 5, "state": state,
                    "attempts": 0, "next_attempt_at": NOW, "created_at": NOW, "updated_at": NOW,
                }
                for n, state in enumerate(("pending", "working", "failed", "done"))
            ],
        )  # fmt: skip
        later = overview(conn, watching=[], now=NOW)
    assert (later.drafts_pending, later.drafts_failed) == (2, 1)
    assert {f.mode for f in later.folders} == {None}
    engine.dispose()


def test_each_account_s_folder_shows_what_its_own_watcher_reports(db_url: str) -> None:
    """Two accounts, each with an INBOX: a worker's report names the account, so one's error
    or watch mode is never shown on the other's folder of the same name."""
    other = "carol@example.test@127.0.0.1"
    engine = index_engine(db_url)
    with engine.begin() as conn:
        for account in (ACCOUNT, other):
            folder_store.ensure_folder(conn, account, "INBOX")
    watching = [
        FolderStatus(
            "INBOX", None, "auth", "NO [AUTHENTICATIONFAILED]", NOW.timestamp(), None, account=other
        ),
        FolderStatus("INBOX", NOW.timestamp(), mode="idle", account=ACCOUNT),
    ]
    with engine.connect() as conn:
        seen = overview(conn, watching=watching, now=NOW)
        by_account = {f.account: (f.mode, f.error) for f in seen.folders}
        assert by_account == {ACCOUNT: ("idle", None), other: (None, "NO [AUTHENTICATIONFAILED]")}
        # A report written before reports named their account still applies, by folder name.
        unnamed = overview(conn, watching=[FolderStatus("INBOX", NOW.timestamp(), mode="polling")], now=NOW)
    assert {f.mode for f in unnamed.folders} == {"polling"}
    engine.dispose()
