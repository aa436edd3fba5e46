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

from sqlalchemy import Connection, Engine, bindparam, inspect, select, text, update
from sqlalchemy.exc import NotSupportedError

from emailops.mime.addresses import parse_addresses, parse_date
from emailops.mime.header_block import HeaderBlock, split_header_block
from emailops.store import fulltext, schema
from emailops.store.content import address_lists
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


# Rows re-parsed per statement by _address_lists: bounded memory on an index of any size.
_REPARSE_BATCH = 1000


def _address_lists(conn: Connection) -> None:
    """To and Cc were stored as "Name <addr>" strings joined by ", ", unquoted, and read back split
    at every comma ("Doe, John <a@b>" read as "Doe" and "John <a@b>"). Each row's From, To, Cc and
    Reply-To are parsed again from its stored header block, by the parser that indexes new mail."""
    json_type = (
        "JSON NOT NULL DEFAULT '{}'" if conn.dialect.name == "sqlite" else "JSONB NOT NULL DEFAULT '{}'"
    )
    _add_column(conn, "messages", "address_lists", json_type)
    if "to_addrs" not in {c["name"] for c in inspect(conn).get_columns("messages")}:
        return  # created with address_lists: nothing stored the old way
    store = (
        update(schema.messages)
        .where(schema.messages.c.id == bindparam("pk"))
        .values(address_lists=bindparam("lists", type_=schema.AddressLists))
    )
    last = 0
    while True:
        batch = conn.execute(
            select(schema.messages.c.id, schema.messages.c.header_block)
            .where(schema.messages.c.id > last)
            .order_by(schema.messages.c.id)
            .limit(_REPARSE_BATCH)
        ).all()
        if not batch:
            break
        conn.execute(store, [{"pk": pk, "lists": _reparsed_addresses(block)} for pk, block in batch])
        last = batch[-1][0]
    conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN to_addrs")
    conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN cc_addrs")


def _reparsed_addresses(block: bytes) -> dict[str, list[list[str]]]:
    fields, _ = split_header_block(block, 0, len(block), [])
    first: dict[str, bytes] = {}
    for name, value in fields:
        first.setdefault(name, value)
    return address_lists(
        {name: parse_addresses(first[name], []) for name in ("from", "to", "cc", "reply-to") if name in first}
    )


_REPLY_HISTORY_INDEXES = ("account_recipient_created", "account_created", "unpurged_created")


def _reply_history(conn: Connection) -> None:
    """The per-sender indexes gain the account as first column (see schema); the hourly cap and
    the history purge get theirs."""
    timestamp = "DATETIME" if conn.dialect.name == "sqlite" else "TIMESTAMP WITH TIME ZONE"
    for table in (schema.outbox, schema.llm_jobs):
        _add_column(conn, table.name, "purged_at", timestamp)
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS ix_{table.name}_recipient_created")
        added = {f"ix_{table.name}_{name}" for name in _REPLY_HISTORY_INDEXES}
        for index in table.indexes:
            if index.name in added:
                index.create(conn, checkfirst=True)


def _outbox_claimed_at(conn: Connection) -> None:
    timestamp = "DATETIME" if conn.dialect.name == "sqlite" else "TIMESTAMP WITH TIME ZONE"
    _add_column(conn, "outbox", "claimed_at", timestamp)


# Append-only: the database itself refuses to change or delete an audit row, whoever asks. Each
# statement can run again (a database brought back to an older version migrates again).
_AUDIT_APPEND_ONLY = {
    "sqlite": [
        f"CREATE TRIGGER IF NOT EXISTS audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
        for verb in ("UPDATE", "DELETE")
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$",
        "DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log",
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    ],
}


def _account_state(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.account_state])


def _users_and_audit_log(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.users, schema.audit_log])
    for statement in _AUDIT_APPEND_ONLY[conn.dialect.name]:
        conn.exec_driver_sql(statement)


def _console_sessions(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.console_sessions, schema.sign_in_failures])


def _imap_fairness(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.imap_connection_slots, schema.imap_login_pacing])


def _accounts(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.accounts])


def _search_language(conn: Connection) -> None:
    """The search terms of ``emailops.store.search_terms`` (fields, folding and CJK pairs the same on
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


def _console_operations(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.rules_versions, schema.rule_decisions])
    timestamp = "DATETIME" if conn.dialect.name == "sqlite" else "TIMESTAMP WITH TIME ZONE"
    _add_column(conn, "folders", "fetch_requested_at", timestamp)


def _search_counts(conn: Connection) -> None:
    """A count of text alone subtracts the matches a search does not see; this index finds the
    expunged messages among them (measured in bench/README.md "Search")."""
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_messages_expunged ON messages (folder_id) "
        "WHERE expunged_at IS NOT NULL"
    )


# The large values each indexed message writes on PostgreSQL: compressing them with pglz, the
# default, was up to a quarter of the server's CPU in an initial sync (bench/README.md).
_LZ4_COLUMNS = (("messages", "body_text"), ("messages", "header_block"), ("search_terms", "vector"))


def _lz4_compression(conn: Connection) -> None:
    """PostgreSQL compresses the values written from now on with lz4 (those written before stay
    pglz and read as before). A server built without lz4 keeps pglz."""
    # SET COMPRESSION came with PostgreSQL 14; an older server keeps pglz.
    if conn.dialect.name != "postgresql" or (conn.dialect.server_version_info or (0,)) < (14,):
        return
    try:
        with conn.begin_nested():
            for table, column in _LZ4_COLUMNS:
                conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")
    except NotSupportedError:
        pass


def _flag_test(dialect: str, flag: str) -> str:
    """The flag test of the search's backends (``has_flag``), as their SQL text renders it: a
    partial index serves only a query repeating its predicate."""
    if dialect == "sqlite":
        patterns = (flag, f"{flag} %", f"% {flag}", f"% {flag} %")
        return "(" + " OR ".join(f"flags LIKE '{pattern}'" for pattern in patterns) + ")"
    return f"(strpos((' ' || lower(flags)) || ' ', ' {flag} ') > 0)"


def _search_ranking(conn: Connection) -> None:
    """Counts of unread and of flagged messages read a partial index of those alone (covering, so
    no row is read); PostgreSQL ranks by a message's first terms (``search_terms.rank_vector``),
    recomputed for every stored message (SQLite's bm25 reads FTS5's own statistics)."""
    dialect = conn.dialect.name
    for name, predicate in (
        ("ix_messages_unread", "NOT " + _flag_test(dialect, "\\seen")),
        ("ix_messages_flagged", _flag_test(dialect, "\\flagged")),
    ):
        conn.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS {name} ON messages (folder_id, flags, expunged_at) "
            f"WHERE expunged_at IS NULL AND {predicate}"
        )
    if dialect == "sqlite":
        return
    conn.exec_driver_sql("ALTER TABLE search_terms ADD COLUMN IF NOT EXISTS rank_vector tsvector")
    fulltext.rebuild(conn)
    conn.exec_driver_sql("ALTER TABLE search_terms ALTER COLUMN rank_vector SET NOT NULL")


def _oauth2_authorize_url(conn: Connection) -> None:
    _add_column(conn, "accounts", "oauth2_authorize_url", "VARCHAR(1000)")


def _overview_indexes(conn: Connection) -> None:
    """The overview reads indexes instead of every message (measured in bench/README.md
    "Console"): its mail indexed per hour the last day's entries of ``indexed_at``, its count of
    a folder's expunged messages a partial index of those (with the folder's UIDVALIDITY, which
    ``ix_messages_expunged`` lacks: SQLite took the unique key and read every row instead)."""
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_messages_indexed_at ON messages (indexed_at)")
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_messages_expunged_folder ON messages (folder_id, uidvalidity) "
        "WHERE expunged_at IS NOT NULL"
    )


def _mailbox_changes(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.mailbox_changes])


def _lease_workers(conn: Connection) -> None:
    schema.lease_workers.create(conn, checkfirst=True)


def _folder_dates(conn: Connection) -> None:
    """``folder:`` newest first walks this index of the one folder and stops at the limit; before,
    SQLite read all the folder's messages by key and sorted them (bench/README.md "Search")."""
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_messages_folder_date ON messages "
        "(folder_id, (coalesce(date, internal_date, indexed_at)), id, flags, size, has_attachments, "
        "expunged_at) WHERE expunged_at IS NULL"
    )
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ANALYZE messages")  # the statistics of the new index's date expression


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
    Migration(11, "messages.address_lists (parsed) replaces to_addrs and cc_addrs (strings)", _address_lists),
    Migration(
        12, "outbox, llm_jobs: purged_at; indexes of the reply limits and the history purge", _reply_history
    ),
    Migration(13, "search terms of the search language; indexes for its operators", _search_language),
    Migration(14, "outbox.claimed_at: claims timed by the database's clock", _outbox_claimed_at),
    Migration(15, "accounts: the deployment's mailboxes, secrets encrypted", _accounts),
    Migration(16, "account_state: each mail account's state, last error and next attempt", _account_state),
    Migration(17, "users and the append-only audit_log of the operator console", _users_and_audit_log),
    Migration(
        18,
        "rules_versions, rule_decisions and folders.fetch_requested_at of the console",
        _console_operations,
    ),
    Migration(19, "search: an index of expunged messages, for exact counts", _search_counts),
    Migration(
        20,
        "PostgreSQL: message bodies, header blocks and search vectors compressed with lz4",
        _lz4_compression,
    ),
    Migration(21, "console_sessions and sign_in_failures of the operator console", _console_sessions),
    Migration(22, "imap_connection_slots and imap_login_pacing: fairness between mailboxes", _imap_fairness),
    Migration(
        23, "search: indexes of unread and flagged messages; PostgreSQL ranks by first terms", _search_ranking
    ),
    Migration(24, "accounts.oauth2_authorize_url: the console's OAuth2 Reconnect", _oauth2_authorize_url),
    Migration(25, "overview: an index of messages by the time they were indexed", _overview_indexes),
    Migration(
        27, "mailbox_changes: changes put off while the account had no IMAP slot free", _mailbox_changes
    ),
    Migration(28, "lease_workers: the workers sharing the folders, for each one's share", _lease_workers),
    Migration(29, "search: an index of each folder's messages by date", _folder_dates),
)


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_migrations"):
        return 0
    versions = conn.execute(select(schema.schema_migrations.c.version)).scalars().all()
    return max(versions, default=0)


def migrate(engine: Engine) -> list[Migration]:
    """Apply the pending migrations in one transaction (both dialects have transactional DDL).

    Pending is every migration not recorded, also one below the last recorded version: versions
    are assigned to changes made side by side, so one may arrive after a higher one ran."""
    applied: list[Migration] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        schema.schema_migrations.create(conn, checkfirst=True)
        # By version recorded, not by the highest: numbers are handed out to work done in parallel,
        # so a database may have a later step applied before an earlier one lands.
        done = set(conn.execute(select(schema.schema_migrations.c.version)).scalars())
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            migration.apply(conn)
            conn.execute(
                schema.schema_migrations.insert().values(
                    version=migration.version, name=migration.name, applied_at=datetime.now(UTC)
                )
            )
            applied.append(migration)
    return applied
