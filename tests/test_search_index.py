"""The search index itself: terms recomputed from a stored row equal those made at parse time,
and migration 13 rebuilds the index of messages stored before it."""

from __future__ import annotations

from sqlalchemy import select, text

from emailops.search.service import SearchOptions, message_keys
from emailops.store.database import reading
from emailops.store.fulltext import message_terms, rebuild, stored_terms
from emailops.store.migrations import MIGRATIONS, _create_fulltext_v1
from emailops.store.schema import attachments, messages
from tests.index_helpers import index_engine
from tests.search_mailbox import ACCOUNT, NOW, build_mailbox, store

MAILBOX = build_mailbox(seed=11, size=30)


def test_terms_from_a_stored_row_equal_the_terms_of_the_parsed_message(db_url: str) -> None:
    engine = index_engine(db_url)
    store(engine, MAILBOX)
    by_id = {s.parsed.message_id: s.parsed for s in MAILBOX if s.parsed.message_id}
    with engine.connect() as conn:
        names: dict[int, list[str]] = {}
        for pk, name in conn.execute(select(attachments.c.message_pk, attachments.c.filename)):
            names.setdefault(pk, []).append(name)
        rows = conn.execute(
            select(
                messages.c.id,
                messages.c.message_id,
                messages.c.subject,
                messages.c.header_block,
                messages.c.body_text,
            )
        ).all()
    checked = 0
    for pk, message_id, subject, block, body in rows:
        if message_id in by_id:
            assert stored_terms(subject, bytes(block), body, names.get(pk, [])) == message_terms(
                by_id[message_id]
            )
            checked += 1
    assert checked >= 20


def _state_before_migration_13(engine_url: str) -> None:
    """Back to schema version 10: the first full-text index, no search terms."""
    engine = index_engine(engine_url)
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TABLE search_fts")
            conn.exec_driver_sql("DROP TRIGGER messages_search_delete")
        else:
            conn.exec_driver_sql("DROP TABLE search_terms")
        for index in ("ix_messages_search_date", "ix_messages_thread_key", "ix_outbox_message_pk"):
            conn.exec_driver_sql(f"DROP INDEX {index}")
        _create_fulltext_v1(conn)
        conn.exec_driver_sql("DELETE FROM schema_migrations WHERE version >= 13")
    engine.dispose()


def test_migration_13_indexes_the_messages_stored_before_it(db_url: str) -> None:
    engine = index_engine(db_url)
    store(engine, MAILBOX)
    options = SearchOptions(limit=1_000, now=NOW)
    queries = ("invoice", "from:bob@builders.example.org", "外贸", "attachment:report", "-plan")
    with reading(engine) as conn:
        before = {q: message_keys(conn, ACCOUNT, q, options) for q in queries}
    engine.dispose()
    _state_before_migration_13(db_url)
    engine = index_engine(db_url)  # migrates
    with reading(engine) as conn:
        assert {q: message_keys(conn, ACCOUNT, q, options) for q in queries} == before
        assert all(before[q] for q in queries)
        version = conn.execute(text("SELECT max(version) FROM schema_migrations")).scalar_one()
    assert version == MIGRATIONS[-1].version


def test_deleted_messages_leave_the_index_and_rebuild_repairs_it(db_url: str) -> None:
    engine = index_engine(db_url)
    store(engine, MAILBOX)
    options = SearchOptions(limit=1_000, now=NOW)
    with engine.begin() as conn:
        conn.execute(messages.delete().where(messages.c.uid <= 10))
        sqlite = conn.dialect.name == "sqlite"
        counting = "SELECT count(*) FROM search_fts" if sqlite else "SELECT count(*) FROM search_terms"
        indexed = conn.execute(text(counting)).scalar_one()
        assert indexed == conn.execute(text("SELECT count(*) FROM messages")).scalar_one()
        found = message_keys(conn, ACCOUNT, "-zebra", options)
        assert rebuild(conn) == indexed
        assert message_keys(conn, ACCOUNT, "-zebra", options) == found
    assert all(uid > 10 for _, _, uid in found)
