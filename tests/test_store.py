"""The index store on SQLite and PostgreSQL alike: migrations, idempotent writes, search, leases."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, inspect

from emailops.mime.model import Address, Attachment, ParsedMessage
from emailops.mime.parse import parse_message
from emailops.search.query import QueryError
from emailops.search.service import SearchOptions, search
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.content import message_content
from emailops.store.database import SQLITE_CACHE_KIB, SQLITE_POOL_SIZE, create_index_engine, reading
from emailops.store.migrations import MIGRATIONS, current_version, migrate
from tests.index_helpers import age_leases, index_engine, rows

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def parsed(n: int, *, subject: str = "", body: str = "", sender: str = "ann@example.org") -> ParsedMessage:
    return ParsedMessage(
        message_id=f"<m{n}@example.org>",
        subject=subject or f"subject {n}",
        from_=(Address("Ann Example", sender),),
        to=(Address("", "me@example.test"),),
        cc=(),
        reply_to=(),
        date=NOW,
        in_reply_to=None,
        references=(),
        list_id=None,
        auto_submitted=None,
        return_path=None,
        headers={"subject": (subject,), "x-custom": ("yes",)},
        body_text=body or f"body {n}",
        attachments=(Attachment("report.pdf", "application/pdf", 1234),),
        size=500,
        thread_key=f"<m{n}@example.org>",
    )


def fetched(n: int, **kwargs: str) -> message_store.FetchedMessage:
    return message_store.FetchedMessage(n, ("\\Seen",), NOW, None, message_content(parsed(n, **kwargs)))


def test_migrations_run_once_and_are_recorded(db_url: str) -> None:
    engine = create_index_engine(db_url)
    assert [m.version for m in migrate(engine)] == [m.version for m in MIGRATIONS]
    assert migrate(engine) == []
    with engine.connect() as conn:
        assert current_version(conn) == MIGRATIONS[-1].version


def test_writes_are_idempotent_on_folder_uidvalidity_uid(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        first = message_store.insert_messages(
            conn, folder.id, 7, [fetched(1), fetched(2)], baseline_uidnext=2, now=NOW
        )
        again = message_store.insert_messages(
            conn, folder.id, 7, [fetched(1), fetched(2), fetched(3)], baseline_uidnext=2, now=NOW
        )
        other_generation = message_store.insert_messages(
            conn, folder.id, 8, [fetched(1)], baseline_uidnext=2, now=NOW
        )
        assert folder_store.ensure_folder(conn, "acct", "INBOX").id == folder.id
    assert len(first) == 2 and len(again) == 1 and len(other_generation) == 1
    assert rows(engine, "SELECT uidvalidity, uid, rules_state FROM messages ORDER BY id") == [
        (7, 1, "history"),
        (7, 2, "pending"),
        (7, 3, "pending"),
        (8, 1, "history"),
    ]
    assert rows(engine, "SELECT count(*) FROM attachments") == [(4,)]
    with reading(engine) as conn:
        assert len(search(conn, "acct", "body", SearchOptions())) == 4


def test_a_batch_reaches_postgresql_as_one_statement_with_its_terms_and_attachments(pg_url: str) -> None:
    """On PostgreSQL a batch of new mail, its search vectors and its attachments (in their order)
    are written by one statement, whatever the batch's size; written again, the batch adds nothing."""
    engine = index_engine(pg_url)
    files = (Attachment("zeta.txt", "text/plain", 10), Attachment("alpha.pdf", "application/pdf", 20))

    def item(n: int) -> message_store.FetchedMessage:
        content = message_content(replace(parsed(n, body=f"batchword{n}"), attachments=files))
        return message_store.FetchedMessage(n, (), NOW, None, content)

    statements: list[str] = []
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        event.listen(conn, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
        first = message_store.insert_messages(
            conn, folder.id, 1, [item(n) for n in range(1, 121)], baseline_uidnext=None, now=NOW
        )
        assert len(statements) == 1
        again = message_store.insert_messages(
            conn, folder.id, 1, [item(n) for n in range(1, 122)], baseline_uidnext=None, now=NOW
        )
    assert sorted(first) == list(range(1, 121)) and list(again) == [121]
    assert rows(engine, "SELECT count(*) FROM search_terms") == [(121,)]
    assert rows(engine, "SELECT count(*), count(DISTINCT message_pk) FROM attachments") == [(242, 121)]
    in_order = rows(engine, "SELECT message_pk, filename FROM attachments ORDER BY id")
    assert [name for pk, name in in_order if pk == first[7]] == ["zeta.txt", "alpha.pdf"]
    with reading(engine) as conn:
        assert [h.uid for h in search(conn, "acct", "batchword7", SearchOptions())] == [7]
        assert len(search(conn, "acct", "attachment:zeta", SearchOptions(limit=500))) == 121


def test_postgresql_compresses_new_bodies_and_search_vectors_with_lz4(pg_url: str) -> None:
    engine = index_engine(pg_url)
    body = " ".join(f"word{n % 700}" for n in range(6000))
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        message_store.insert_messages(
            conn, folder.id, 1, [fetched(1, body=body)], baseline_uidnext=None, now=NOW
        )
    assert rows(
        engine,
        "SELECT pg_column_compression(body_text), pg_column_compression(vector) "
        "FROM messages JOIN search_terms ON message_pk = messages.id",
    ) == [("lz4", "lz4")]


def test_search_behaves_the_same_on_both_backends(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        message_store.insert_messages(
            conn,
            folder.id,
            1,
            [
                fetched(1, subject="Quarterly report", body="numbers are up"),
                fetched(2, subject="Lunch", body="the quarterly numbers later", sender="bob@example.net"),
                fetched(3, subject="Café crème", body="Grüße aus Zürich"),
            ],
            baseline_uidnext=None,
            now=NOW,
        )
    with reading(engine) as conn:

        def uids(query: str) -> list[int]:
            return sorted(h.uid for h in search(conn, "acct", query, SearchOptions()))

        assert uids("quarterly") == [1, 2]
        assert uids("quarterly numbers") == [1, 2]
        assert uids('"quarterly numbers"') == [2]
        assert uids("quart*") == [1, 2]
        assert uids("bob@example.net") == [2]
        assert uids("example.net") == [2]
        assert uids("Zürich") == [3]
        assert uids("crème") == [3]
        for unparsable in ('"unbalanced AND ( OR *', ""):
            with pytest.raises(QueryError):
                uids(unparsable)
        assert search(conn, "other-account", "quarterly", SearchOptions()) == []
        hit = search(conn, "acct", "later", SearchOptions())[0]
        assert "[later]" in hit.snippet.marked() and hit.sender == "Ann Example <bob@example.net>"


def test_flag_updates_write_and_count_only_real_changes(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        message_store.insert_messages(
            conn, folder.id, 1, [fetched(n) for n in range(1, 1_202)], baseline_uidnext=None, now=NOW
        )
    unchanged = {uid: (("\\Seen",), None) for uid in range(1, 1_202)}
    for server in (dict(list(unchanged.items())[:10]), unchanged):  # looked up by UID, or the folder read
        changed = {**server, 7: (("\\Seen", "\\Flagged"), None), 9999: (("\\Seen",), None)}
        with engine.begin() as conn:
            assert message_store.update_flags(conn, folder.id, 1, server) == 0
            assert message_store.update_flags(conn, folder.id, 1, changed) == 1
            assert message_store.update_flags(conn, folder.id, 1, changed) == 0  # already applied
        assert rows(engine, "SELECT flags FROM messages WHERE uid = 7") == [("\\Seen \\Flagged",)]
        with engine.begin() as conn:
            message_store.update_flags(conn, folder.id, 1, {7: (("\\Seen",), None)})


def test_expunged_messages_are_kept_but_not_found(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        message_store.insert_messages(
            conn, folder.id, 1, [fetched(1), fetched(2)], baseline_uidnext=None, now=NOW
        )
        assert message_store.mark_expunged(conn, folder.id, 1, [2], NOW) == 1
        assert message_store.mark_expunged(conn, folder.id, 1, [2], NOW) == 0
        folder_store.save_sync_state(conn, folder.id, uidvalidity=1, uidnext=3, highestmodseq=None, now=NOW)
        stats = message_store.folder_stats(conn, "acct")
    assert [(s.name, s.messages, s.expunged) for s in stats] == [("INBOX", 1, 1)]
    with reading(engine) as conn:
        assert [h.uid for h in search(conn, "acct", "body", SearchOptions())] == [1]


def test_stored_message_round_trips_for_the_rules(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        (pk,) = message_store.insert_messages(
            conn, folder.id, 1, [fetched(5)], baseline_uidnext=1, now=NOW
        ).values()
        stored = message_store.load_message(conn, pk)
    assert stored is not None
    assert (stored.folder, stored.uid, stored.rules_state) == ("INBOX", 5, "pending")
    original = parsed(5)
    assert stored.parsed.from_ == original.from_
    assert stored.parsed.to == original.to
    assert stored.parsed.header("X-Custom") == "yes"
    assert stored.parsed.attachments == original.attachments
    assert stored.parsed.date == NOW


def index_raw(engine: Engine, raw: bytes) -> int:
    """Parse ``raw`` and index it as UID 1 of INBOX; return its primary key."""
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        item = message_store.FetchedMessage(1, (), NOW, None, message_content(parse_message(raw)))
        (pk,) = message_store.insert_messages(
            conn, folder.id, 1, [item], baseline_uidnext=1, now=NOW
        ).values()
    return pk


def test_headers_parsed_from_raw_mail_round_trip_through_the_index(db_url: str) -> None:
    raw = (
        b"From: Ann <ann@example.org>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"X-Ticket: T-1\r\n  (folded)\r\nX-Ticket: T-2\r\nPrecedence: bulk\r\n\r\nbody\r\n"
    )
    engine = index_engine(db_url)
    pk = index_raw(engine, raw)
    with reading(engine) as conn:
        stored = message_store.load_message(conn, pk)
    assert stored is not None
    assert stored.parsed.headers["x-ticket"] == ("T-1 (folded)", "T-2")
    assert stored.parsed.headers["subject"] == ("Grüße",)
    assert stored.parsed.header("Precedence") == "bulk"
    assert dict(stored.parsed.headers) == dict(parse_message(raw).headers)


def test_an_index_from_before_header_block_is_upgraded_in_place(db_url: str) -> None:
    """Migration 3: rows that kept their headers decoded (headers_json) keep them, as a block."""
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        (pk,) = message_store.insert_messages(
            conn, folder.id, 1, [fetched(1)], baseline_uidnext=1, now=NOW
        ).values()
        # Back to schema version 2: the decoded headers in headers_json, no raw block yet.
        conn.exec_driver_sql("DELETE FROM schema_migrations WHERE version >= 3")
        conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN header_block")
        conn.exec_driver_sql("ALTER TABLE messages ADD COLUMN headers_json TEXT NOT NULL DEFAULT '{}'")
        conn.exec_driver_sql(
            'UPDATE messages SET headers_json = \'{"x-ticket": ["T-1", "T-2"], "subject": ["Grüße"]}\''
        )
    assert [m.version for m in migrate(engine)] == [m.version for m in MIGRATIONS if m.version >= 3]
    with engine.connect() as conn:
        stored = message_store.load_message(conn, pk)
        columns = {c["name"] for c in inspect(conn).get_columns("messages")}
    assert stored is not None
    assert dict(stored.parsed.headers) == {"x-ticket": ("T-1", "T-2"), "subject": ("Grüße",)}
    assert "headers_json" not in columns and "header_block" in columns


def test_message_dates_are_stored_as_the_utc_instant(db_url: str) -> None:
    raw = b"From: a@example.org\r\nDate: Mon, 06 May 2024 09:00:00 +0200\r\nSubject: zebra\r\n\r\nbody\r\n"
    engine = index_engine(db_url)
    pk = index_raw(engine, raw)
    with reading(engine) as conn:
        stored = message_store.load_message(conn, pk)
        (hit,) = search(conn, "acct", "zebra", SearchOptions())
    assert stored is not None
    assert stored.parsed.date == hit.date == datetime(2024, 5, 6, 7, 0, tzinfo=UTC)


def test_sqlite_dates_stored_at_the_senders_offset_are_corrected(tmp_path: Path) -> None:
    """Migration 4: before it, SQLite rows kept a Date at its sender's offset, read back as UTC."""
    raw = b"From: a@example.org\r\nDate: Mon, 06 May 2024 09:00:00 +0200\r\nSubject: zebra\r\n\r\nbody\r\n"
    engine = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    index_raw(engine, raw)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE messages SET date = '2024-05-06 09:00:00.000000'")  # as stored before
        conn.exec_driver_sql("DELETE FROM schema_migrations WHERE version >= 4")
    assert [m.version for m in migrate(engine)] == [m.version for m in MIGRATIONS if m.version >= 4]
    assert rows(engine, "SELECT date FROM messages") == [("2024-05-06 07:00:00.000000",)]


def test_sqlite_stores_moments_and_flags_as_earlier_versions_did(tmp_path: Path) -> None:
    """Existing SQLite indexes are read and compared as text: a moment is naive UTC ISO text with
    microseconds whatever its offset, a boolean 0 or 1."""
    engine = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    sent = datetime(2024, 5, 6, 9, 0, tzinfo=timezone(timedelta(hours=2)))
    received = datetime(2024, 5, 6, 8, 30, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    content = message_content(replace(parsed(1), date=sent))
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        message_store.insert_messages(
            conn,
            folder.id,
            1,
            [message_store.FetchedMessage(1, (), received, None, content)],
            baseline_uidnext=None,
            now=NOW,
        )
        folder_store.save_sync_state(conn, folder.id, uidvalidity=1, uidnext=2, highestmodseq=None, now=NOW)
    assert rows(
        engine,
        "SELECT date, internal_date, indexed_at, typeof(date), has_attachments, truncated FROM messages",
    ) == [
        (
            "2024-05-06 07:00:00.000000",
            "2024-05-06 07:30:00.123456",
            "2026-01-05 12:00:00.000000",
            "text",
            1,
            0,
        )
    ]
    assert rows(engine, "SELECT last_sync_at FROM folders") == [("2026-01-05 12:00:00.000000",)]


def test_a_folder_lease_has_one_live_owner_and_a_new_epoch_at_each_takeover(db_url: str) -> None:
    engine = index_engine(db_url)
    ttl = timedelta(seconds=60)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        first = folder_store.acquire_lease(conn, folder.id, "w1", ttl)
        assert first is not None
        assert folder_store.acquire_lease(conn, folder.id, "w2", ttl) is None
        assert folder_store.acquire_lease(conn, folder.id, "w1", ttl) == first  # renewed: same epoch
    # w1 died: its lease runs out (by the database's clock) and w2 takes the folder over.
    age_leases(engine, ttl + timedelta(seconds=1))
    with engine.begin() as conn:
        assert folder_store.acquire_lease(conn, folder.id, "w2", ttl) == first + 1
        folder_store.release_lease(conn, folder.id, "w1")  # not the owner any more: no effect
        assert folder_store.acquire_lease(conn, folder.id, "w1", ttl) is None
        # A holder known dead (a replaced worker of this run) is replaced at once.
        assert folder_store.acquire_lease(conn, folder.id, "w3", ttl, replacing="w2") == first + 2
        folder_store.release_lease(conn, folder.id, "w3")
        assert folder_store.acquire_lease(conn, folder.id, "w1", ttl) == first + 3


def test_a_former_holder_cannot_write_the_folder_state_after_a_takeover(db_url: str) -> None:
    engine = index_engine(db_url)
    ttl = timedelta(seconds=60)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        old = folder_store.acquire_lease(conn, folder.id, "paused", ttl)
        folder_store.save_progress(conn, folder.id, uidnext=5, fence=old)
    age_leases(engine, ttl + timedelta(seconds=1))
    with engine.begin() as conn:
        new = folder_store.acquire_lease(conn, folder.id, "live", ttl)
        folder_store.save_progress(conn, folder.id, uidnext=9, fence=new)
    for write in (
        lambda conn: folder_store.save_progress(conn, folder.id, uidnext=6, fence=old),
        lambda conn: folder_store.touch_sync(conn, folder.id, NOW, fence=old),
        lambda conn: folder_store.save_sync_state(
            conn, folder.id, uidvalidity=1, uidnext=6, highestmodseq=None, now=NOW, fence=old
        ),
    ):
        with pytest.raises(folder_store.LeaseLostError), engine.begin() as conn:
            write(conn)
    with engine.connect() as conn:
        assert folder_store.get_folder(conn, "acct", "INBOX").uidnext == 9  # type: ignore[union-attr]


def test_a_sqlite_engine_keeps_a_bounded_number_of_connections_each_with_a_bounded_page_cache(
    tmp_path: Path,
) -> None:
    # What a long-running worker holds for SQLite at rest: SQLITE_POOL_SIZE connections, each with
    # a page cache of SQLITE_CACHE_KIB (issue 14).
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    with contextlib.ExitStack() as stack:
        connections = [stack.enter_context(reading(engine)) for _ in range(SQLITE_POOL_SIZE + 2)]
        assert engine.pool.checkedout() == SQLITE_POOL_SIZE + 2  # more than the pool keeps, at once
        for conn in connections:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -SQLITE_CACHE_KIB
    assert engine.pool.checkedin() == SQLITE_POOL_SIZE
    engine.dispose()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_sqlite_index_and_its_wal_are_private_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)  # the usual umask, which made the index 0644 before
    try:
        new = tmp_path / "new" / "index.sqlite3"
        engine = index_engine(f"sqlite:///{new}")
        with engine.begin() as conn:
            folder_store.ensure_folder(conn, "acct", "INBOX")
        # The pool keeps a connection open, so the -wal and -shm files are there.
        wal, shm = new.with_name(new.name + "-wal"), new.with_name(new.name + "-shm")
        assert [_mode(path) for path in (new, wal, shm)] == [0o600, 0o600, 0o600]
        engine.dispose()

        existing = tmp_path / "operators.sqlite3"
        existing.touch()
        existing.chmod(0o640)
        engine = index_engine(f"sqlite:///{existing}")
        with reading(engine) as conn:
            assert current_version(conn) == MIGRATIONS[-1].version
        assert _mode(existing) == 0o640
        engine.dispose()
    finally:
        os.umask(umask)
