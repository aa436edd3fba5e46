"""Schema migrations: ordered steps, each applied once and recorded in ``schema_migrations``.

Migrations run at start (workers, CLI) and by ``emailops migrate``; an upgrade never needs the
database deleted. A step is written for both dialects; a new step is appended, never edited. The
first step creates the tables as ``schema`` defines them now, so a later step that adds a column
checks first: on a new database the column is already there.
Hand-rolled rather than Alembic: the full-text structures (an FTS5 virtual table, a generated
tsvector column) are dialect-specific DDL either way, and the list below is the whole history.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, inspect, select, text

from emailops.mime.addresses import parse_date
from emailops.mime.header_block import HeaderBlock, split_header_block
from emailops.store import fulltext, schema
from emailops.store.schema import sqlite_datetime

# A lock key so that two processes starting at once do not both migrate (PostgreSQL).
_PG_MIGRATION_LOCK = 0x656D61696C6F7073


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


def _create_fulltext_v1(conn: Connection) -> None:
    """The first full-text index (subject, addresses and body as the database split them),
    replaced by version 13."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE messages_fts USING fts5("
            "subject, addresses, body_text, content='messages', content_rowid='id', "
            "tokenize='unicode61 remove_diacritics 2')"
        )
        return
    words = [
        f"translate(coalesce({c}, ''), '@./:_-<>', '        ')" for c in ("subject", "addresses", "body_text")
    ]
    conn.exec_driver_sql(
        "ALTER TABLE messages ADD COLUMN search_vector tsvector GENERATED ALWAYS AS ("
        f"setweight(to_tsvector('simple', {words[0]}), 'A') || "
        f"setweight(to_tsvector('simple', {words[1]}), 'B') || "
        f"setweight(to_tsvector('simple', {words[2]}), 'C')) STORED"
    )
    conn.exec_driver_sql("CREATE INDEX ix_messages_search ON messages USING GIN (search_vector)")


def _initial_schema(conn: Connection) -> None:
    schema.metadata.create_all(
        conn,
        tables=[schema.folders, schema.messages, schema.attachments, schema.outbox],
    )
    _create_fulltext_v1(conn)


def _fulltext_v1_tuning(conn: Connection) -> None:
    if conn.dialect.name == "sqlite" and inspect(conn).has_table("messages_fts"):
        conn.exec_driver_sql("INSERT INTO messages_fts(messages_fts, rank) VALUES ('automerge', 8)")


def _add_column(conn: Connection, table: str, column: str, ddl_type: str) -> None:
    if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl_type}")


def _folder_server_count(conn: Connection) -> None:
    _add_column(conn, "folders", "server_count", "BIGINT")


def _header_block(conn: Connection) -> None:
    """Rows stored each header decoded in ``headers_json``; the raw block replaces it. Old rows
    get a block rebuilt from their decoded values, which decodes to the same headers."""
    blob = "BLOB" if conn.dialect.name == "sqlite" else "BYTEA"
    empty = "x''" if conn.dialect.name == "sqlite" else "''::bytea"
    _add_column(conn, "messages", "header_block", f"{blob} NOT NULL DEFAULT {empty}")
    if "headers_json" not in {c["name"] for c in inspect(conn).get_columns("messages")}:
        return
    rows = conn.exec_driver_sql("SELECT id, headers_json FROM messages").all()
    blocks = [
        {"pk": pk, "block": HeaderBlock.from_values(json.loads(headers_json or "{}")).raw}
        for pk, headers_json in rows
    ]
    if blocks:
        conn.execute(text("UPDATE messages SET header_block = :block WHERE id = :pk"), blocks)
    conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN headers_json")


def _sqlite_dates_in_utc(conn: Connection) -> None:
    """SQLite keeps no time zone, and message dates were stored at their sender's offset (a
    +0200 Date read back two hours late). Recomputed in UTC from the stored Date header."""
    if conn.dialect.name != "sqlite":
        return  # timestamptz kept the instant
    fixed = []
    for pk, block, stored in conn.exec_driver_sql("SELECT id, header_block, date FROM messages"):
        fields, _ = split_header_block(block or b"", 0, len(block or b""), [])
        value = next((v for name, v in fields if name == "date"), None)
        moment = parse_date(value, []) if value is not None else None
        if moment is None:
            continue
        utc = sqlite_datetime(moment)
        if utc != stored:
            fixed.append({"pk": pk, "date": utc})
    if fixed:
        conn.execute(text("UPDATE messages SET date = :date WHERE id = :pk"), fixed)


def _rules_attempts(conn: Connection) -> None:
    timestamp = "DATETIME" if conn.dialect.name == "sqlite" else "TIMESTAMP WITH TIME ZONE"
    _add_column(conn, "messages", "rules_attempts", "INTEGER NOT NULL DEFAULT 0")
    _add_column(conn, "messages", "rules_claimed_at", timestamp)
    _add_column(conn, "messages", "rules_claimed_by", "VARCHAR(200)")
    _add_column(conn, "messages", "quarantine_reason", "TEXT")
    # Messages the former 'error' state parked (the rules raised on them) count as quarantined.
    conn.exec_driver_sql(
        "UPDATE messages SET rules_state = 'quarantined', "
        "quarantine_reason = 'the rules raised an error (before quarantine was recorded)' "
        "WHERE rules_state = 'error'"
    )


def _lease_epoch(conn: Connection) -> None:
    _add_column(conn, "folders", "lease_epoch", "BIGINT NOT NULL DEFAULT 0")


def _index_attempts(conn: Connection) -> None:
    _add_column(conn, "folders", "index_attempt_uid", "BIGINT")
    _add_column(conn, "folders", "index_attempts", "INTEGER NOT NULL DEFAULT 0")
    schema.index_quarantine.create(conn, checkfirst=True)


def _oauth2_tokens(conn: Connection) -> None:
    schema.oauth2_tokens.create(conn, checkfirst=True)


def _llm_jobs(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.llm_jobs, schema.llm_calls])


def _search_language(conn: Connection) -> None:
    """The search terms of ``emailops.search.terms`` (fields, folding and CJK pairs the same on
    both backends) replace the first full-text index, recomputed for every stored message; with
    the indexes the search operators use (measured in bench/README.md "Search")."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("DROP TABLE IF EXISTS messages_fts")
    else:
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_messages_search")
        conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN IF EXISTS search_vector")
    fulltext.create_search_index(conn)
    for statement in _SEARCH_INDEXES:
        conn.exec_driver_sql(statement)
    fulltext.rebuild(conn)


_SEARCH_INDEXES = (
    # Newest first walks this index and stops at the limit; the flags, size and folder of a
    # message are read from it, not from the row (whose body comes before them). expunged_at is
    # a column too, or SQLite does not take the index as covering.
    "CREATE INDEX IF NOT EXISTS ix_messages_search_date ON messages "
    "((coalesce(date, internal_date, indexed_at)), id, folder_id, flags, size, has_attachments, expunged_at) "
    "WHERE expunged_at IS NULL",
    "CREATE INDEX IF NOT EXISTS ix_messages_thread_key ON messages (thread_key)",
    "CREATE INDEX IF NOT EXISTS ix_outbox_message_pk ON outbox (message_pk)",
)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema with full-text index", _initial_schema),
    Migration(2, "folders.server_count: EXISTS of the last complete pass", _folder_server_count),
    Migration(3, "messages.header_block (raw) replaces headers_json (decoded)", _header_block),
    Migration(4, "SQLite: message dates in UTC", _sqlite_dates_in_utc),
    Migration(5, "FTS5 merges segments in eights", _fulltext_v1_tuning),
    Migration(6, "messages: rules attempts, claim time and claimer, quarantine reason", _rules_attempts),
    Migration(7, "folders.lease_epoch: the lease's fencing token", _lease_epoch),
    Migration(8, "folders: index attempts; index_quarantine", _index_attempts),
    Migration(9, "oauth2_tokens: the account's OAuth2 sign-in, shared by all workers", _oauth2_tokens),
    Migration(10, "llm_jobs and llm_calls: replies written by a language model", _llm_jobs),
    Migration(13, "search terms of the search language; indexes for its operators", _search_language),
)


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_migrations"):
        return 0
    versions = conn.execute(select(schema.schema_migrations.c.version)).scalars().all()
    return max(versions, default=0)


def migrate(engine: Engine) -> list[Migration]:
    """Apply the pending migrations in one transaction (both dialects have transactional DDL)."""
    applied: list[Migration] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        schema.schema_migrations.create(conn, checkfirst=True)
        done = current_version(conn)
        for migration in MIGRATIONS:
            if migration.version <= done:
                continue
            migration.apply(conn)
            conn.execute(
                schema.schema_migrations.insert().values(
                    version=migration.version, name=migration.name, applied_at=datetime.now(UTC)
                )
            )
            applied.append(migration)
    return applied
