"""Full-text search behind one interface: FTS5 on SQLite, a tsvector with a GIN index on PostgreSQL.

Both index the same three fields of ``messages`` (subject, addresses, body_text) with word
tokenization and no stemming (mail is multilingual), so a query finds the same messages on both.
A query is words (all must match), "quoted phrases" and ``prefix*`` words; it never raises a
syntax error for odd input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, text

from emailops.store.schema import Timestamp

_TOKEN = re.compile(r'"([^"]*)"|(\S+)')
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class SearchHit:
    message_pk: int
    folder: str
    uid: int
    message_id: str | None
    from_: str
    subject: str
    date: datetime | None
    snippet: str


def create_fulltext(conn: Connection) -> None:
    """Create the dialect's full-text structures (called by the migrations)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE messages_fts USING fts5("
            "subject, addresses, body_text, content='messages', content_rowid='id', "
            "tokenize='unicode61 remove_diacritics 2')"
        )
    else:
        conn.exec_driver_sql(
            "ALTER TABLE messages ADD COLUMN search_vector tsvector GENERATED ALWAYS AS ("
            f"setweight(to_tsvector('simple', {_pg_words('subject')}), 'A') || "
            f"setweight(to_tsvector('simple', {_pg_words('addresses')}), 'B') || "
            f"setweight(to_tsvector('simple', {_pg_words('body_text')}), 'C')) STORED"
        )
        conn.exec_driver_sql("CREATE INDEX ix_messages_search ON messages USING GIN (search_vector)")


def set_fulltext_tuning(conn: Connection) -> None:
    """FTS5 merges index segments once eight of a size exist, not four: a bulk load of the index
    (an initial sync, a reindex) then rewrites its segments fewer times, about a fifth less work,
    and a search reads a few more segments, which it does not notice at mailbox sizes."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("INSERT INTO messages_fts(messages_fts, rank) VALUES ('automerge', 8)")


def _pg_words(column: str) -> str:
    # PostgreSQL's parser keeps e-mail addresses, host names and paths as single tokens and drops
    # "<...>" as markup; FTS5 splits them into words. Splitting them here too lets "example.org"
    # or "ann" find "ann@example.org" on both backends.
    return f"translate(coalesce({column}, ''), '@./:_-<>', '        ')"


def index_rows(conn: Connection, rows: Iterable[tuple[int, str, str, str]]) -> None:
    """Add freshly inserted messages (pk, subject, addresses, body_text) to the index.

    PostgreSQL maintains its generated column by itself; SQLite's external-content FTS5 table is
    written here, in the caller's transaction, so the index never drifts from ``messages``.
    """
    if conn.dialect.name != "sqlite":
        return
    params = list(rows)
    if params:  # through the driver: SQLAlchemy's per-row parameter processing was a tenth of it
        conn.exec_driver_sql(
            "INSERT INTO messages_fts(rowid, subject, addresses, body_text) VALUES (?, ?, ?, ?)", params
        )


def rebuild(conn: Connection) -> None:
    """Rebuild the full-text index from ``messages`` (after a bulk delete or for repair)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
    else:
        conn.exec_driver_sql("REINDEX INDEX ix_messages_search")


def _fts5_query(query: str) -> str:
    parts = []
    for phrase, word in _TOKEN.findall(query):
        if phrase:
            words = _WORD.findall(phrase)
            if words:
                parts.append('"' + " ".join(words) + '"')
            continue
        prefix = word.endswith("*")
        words = _WORD.findall(word)
        if not words:
            continue
        quoted = '"' + " ".join(words) + '"'
        parts.append(quoted + "*" if prefix and len(words) == 1 else quoted)
    return " AND ".join(parts)


def _pg_query(query: str) -> str:
    parts = []
    for phrase, word in _TOKEN.findall(query):
        words = _WORD.findall(phrase or word)
        if not words:
            continue
        escaped = [w.replace("'", "") for w in words]
        if word.endswith("*") and len(words) == 1:
            parts.append(f"'{escaped[0]}':*")
        else:
            parts.append("(" + " <-> ".join(f"'{w}'" for w in escaped) + ")")
    return " & ".join(parts)


_SQLITE_SEARCH = """
SELECT m.id, f.name, m.uid, m.message_id, m.from_addr, m.from_name, m.subject, m.date,
       snippet(messages_fts, 2, '[', ']', '...', 16) AS snip
FROM messages_fts
JOIN messages m ON m.id = messages_fts.rowid
JOIN folders f ON f.id = m.folder_id
WHERE messages_fts MATCH :q AND m.expunged_at IS NULL AND f.account = :account
  AND (:folder IS NULL OR f.name = :folder)
ORDER BY rank
LIMIT :limit
"""

_PG_SEARCH = """
SELECT m.id, f.name, m.uid, m.message_id, m.from_addr, m.from_name, m.subject, m.date,
       ts_headline('simple', left(m.body_text, 20000), to_tsquery('simple', :q),
                   'StartSel=[, StopSel=], MaxWords=24, MinWords=8') AS snip
FROM messages m
JOIN folders f ON f.id = m.folder_id
WHERE m.search_vector @@ to_tsquery('simple', :q) AND m.expunged_at IS NULL
  AND f.account = :account AND (CAST(:folder AS TEXT) IS NULL OR f.name = :folder)
ORDER BY ts_rank_cd(m.search_vector, to_tsquery('simple', :q)) DESC, m.id DESC
LIMIT :limit
"""


def search(
    conn: Connection, account: str, query: str, *, folder: str | None = None, limit: int = 20
) -> list[SearchHit]:
    """Messages of ``account`` (not expunged) matching ``query``, best first."""
    sqlite = conn.dialect.name == "sqlite"
    compiled = _fts5_query(query) if sqlite else _pg_query(query)
    if not compiled:
        return []
    statement = (
        text(_SQLITE_SEARCH if sqlite else _PG_SEARCH)
        .bindparams(bindparam("folder", type_=None))
        .columns(date=Timestamp())
    )
    rows = conn.execute(
        statement, {"q": compiled, "account": account, "folder": folder, "limit": limit}
    ).all()
    return [
        SearchHit(
            message_pk=row[0],
            folder=row[1],
            uid=row[2],
            message_id=row[3],
            from_=f"{row[5]} <{row[4]}>" if row[5] else row[4],
            subject=row[6],
            date=row[7],
            snippet=" ".join((row[8] or "").split()),
        )
        for row in rows
    ]
