"""The full-text index behind one interface: FTS5 on SQLite, a tsvector with a GIN index on
PostgreSQL, both over the same search terms of each message (``emailops.store.search_terms``).

SQLite: ``search_fts``, an FTS5 table of one column, rowid = ``messages.id``, ``ascii`` tokenizer;
a trigger removes a message's row when the message is deleted. PostgreSQL: ``search_terms``
(message_pk, vector, rank_vector) with a GIN index on ``vector``, rows deleted with their message
(ON DELETE CASCADE); ``rank_vector`` holds the first ``RANKED_TERMS`` terms alone, what relevance
ranks by (``ranked_terms``).
Both are written in the transaction that inserts the messages, so the index never drifts.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, select

from emailops.mime.addresses import parse_addresses
from emailops.mime.header_block import split_header_block
from emailops.mime.model import Address, ParsedMessage
from emailops.store.schema import attachments, messages
from emailops.store.search_terms import Mailbox, document_terms

_ADDRESS_HEADERS = ("from", "to", "cc", "reply-to")
# PostgreSQL: the tsvector of a message's search terms (an SQL expression, ``{}`` the terms).
VECTOR_OF_TERMS = "to_tsvector('simple', {})"


def create_search_index(conn: Connection) -> None:
    """Create the dialect's full-text structures (called by the migrations)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE IF NOT EXISTS search_fts USING fts5(terms, tokenize='ascii')"
        )
        conn.exec_driver_sql("INSERT INTO search_fts(search_fts, rank) VALUES ('automerge', 8)")
        conn.exec_driver_sql(
            "CREATE TRIGGER IF NOT EXISTS messages_search_delete AFTER DELETE ON messages BEGIN "
            "DELETE FROM search_fts WHERE rowid = old.id; END"
        )
    else:
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS search_terms (message_pk BIGINT PRIMARY KEY "
            "REFERENCES messages(id) ON DELETE CASCADE, vector tsvector NOT NULL, "
            "rank_vector tsvector NOT NULL)"
        )
        conn.exec_driver_sql(
            "CREATE INDEX IF NOT EXISTS ix_search_terms_vector ON search_terms USING GIN (vector)"
        )


def _mailboxes(addresses: Iterable[Address]) -> list[Mailbox]:
    return [Mailbox(a.name, a.email) for a in addresses]


def message_terms(parsed: ParsedMessage) -> str:
    """The search terms of a freshly parsed message."""
    return document_terms(
        subject=parsed.subject,
        from_=_mailboxes(parsed.from_),
        to=_mailboxes(parsed.to),
        cc=_mailboxes(parsed.cc),
        reply_to=_mailboxes(parsed.reply_to),
        attachment_names=[a.filename for a in parsed.attachments if a.filename],
        body=parsed.body_text,
    )


def stored_terms(subject: str, header_block: bytes, body: str, attachment_names: list[str]) -> str:
    """The search terms of an indexed message, from what its row keeps: the same as
    ``message_terms`` gave when it was parsed (addresses from the first of each header)."""
    fields, _ = split_header_block(header_block, 0, len(header_block), [])
    first: dict[str, bytes] = {}
    for name, value in fields:
        first.setdefault(name, value)

    def addresses(name: str) -> list[Mailbox]:
        value = first.get(name)
        return _mailboxes(parse_addresses(value, [])) if value is not None else []

    from_, to, cc, reply_to = (addresses(name) for name in _ADDRESS_HEADERS)
    return document_terms(
        subject=subject,
        from_=from_,
        to=to,
        cc=cc,
        reply_to=reply_to,
        attachment_names=attachment_names,
        body=body,
    )


# PostgreSQL ranks by a message's first terms: its subject, addresses and the start of its body.
# ts_rank of the whole tsvector read each match's out of TOAST (68 MB for a word in 10,728
# messages, bench/README.md "Search"); this many terms stay in the row.
RANKED_TERMS = 100


def ranked_terms(terms: str) -> str:
    """The first ``RANKED_TERMS`` of a message's search terms (PostgreSQL's ``rank_vector``)."""
    return " ".join(terms.split(" ", RANKED_TERMS)[:RANKED_TERMS])


def index_rows(conn: Connection, rows: Iterable[tuple[int, str]]) -> None:
    """Add freshly inserted messages (pk, search terms) to the index, in the caller's transaction."""
    params = list(rows)
    if not params:
        return
    # Through the driver: SQLAlchemy's per-row parameter processing was a tenth of it.
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("INSERT INTO search_fts(rowid, terms) VALUES (?, ?)", params)
    else:
        # VECTOR_OF_TERMS is a constant; the values are parameters.
        vector = VECTOR_OF_TERMS.format("%s")
        conn.exec_driver_sql(
            f"INSERT INTO search_terms (message_pk, vector, rank_vector) VALUES (%s, {vector}, {vector}) "  # noqa: S608  # nosec B608
            "ON CONFLICT (message_pk) DO UPDATE SET vector = excluded.vector, "
            "rank_vector = excluded.rank_vector",
            [(pk, terms, ranked_terms(terms)) for pk, terms in params],
        )


_REBUILD_BATCH = 500


def rebuild(conn: Connection) -> int:
    """Recompute the search terms of every message from its row (after a change of the terms'
    rules, or for repair); return how many messages were indexed."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("DELETE FROM search_fts")
    else:
        conn.exec_driver_sql("DELETE FROM search_terms")
    names: dict[int, list[str]] = {}
    for pk, filename in conn.execute(
        select(attachments.c.message_pk, attachments.c.filename).where(attachments.c.filename.is_not(None))
    ):
        names.setdefault(pk, []).append(filename)
    columns = select(messages.c.id, messages.c.subject, messages.c.header_block, messages.c.body_text)
    total, after = 0, -1
    while batch := conn.execute(
        columns.where(messages.c.id > after).order_by(messages.c.id).limit(_REBUILD_BATCH)
    ).all():
        index_rows(
            conn,
            [
                (pk, stored_terms(subject, bytes(block or b""), body, names.get(pk, [])))
                for pk, subject, block, body in batch
            ],
        )
        total += len(batch)
        after = batch[-1][0]
    return total
