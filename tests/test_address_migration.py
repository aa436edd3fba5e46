"""Migration 11: an index that stored To and Cc as strings gets them parsed again from its headers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, inspect

from emailops.mime.model import Address
from emailops.mime.parse import parse_message
from emailops.search.service import SearchOptions, count
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store import migrations
from emailops.store.content import message_content
from emailops.store.database import reading
from emailops.store.migrations import migrate
from tests.index_helpers import index_engine, rows

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def inbound(n: int) -> bytes:
    return (
        f"From: Sender <sender{n}@example.net>\r\n"
        "Reply-To: =?utf-8?q?M=C3=BCller=2C_Hans?= <hans@example.org>\r\n"
        'To: "Doe, John" <alice@example.com>, other@example.com\r\n'
        "Cc: Team: =?iso-8859-1?q?J=F6rg?= <j@example.org>;, undisclosed-recipients:;\r\n"
        f"Subject: corrmark {n}\r\nMessage-ID: <corrmark-{n}@example.net>\r\n\r\nbody {n}\r\n"
    ).encode()


def to_old_format(engine: Engine) -> None:
    """Back to schema version 10: To and Cc as the unquoted strings it stored, no address_lists."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM schema_migrations WHERE version >= 11")
        conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN address_lists")
        conn.exec_driver_sql("ALTER TABLE messages ADD COLUMN to_addrs TEXT NOT NULL DEFAULT ''")
        conn.exec_driver_sql("ALTER TABLE messages ADD COLUMN cc_addrs TEXT NOT NULL DEFAULT ''")
        conn.exec_driver_sql(
            "UPDATE messages SET to_addrs = 'Doe, John <alice@example.com>, other@example.com', "
            "cc_addrs = 'Jörg <j@example.org>'"
        )


def test_old_rows_are_parsed_again_from_their_header_block(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrations, "_REPARSE_BATCH", 2)  # five rows: three batches
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, "acct", "INBOX")
        items = [
            message_store.FetchedMessage(n, (), NOW, None, message_content(parse_message(inbound(n))))
            for n in range(1, 6)
        ]
        pks = message_store.insert_messages(conn, folder.id, 1, items, baseline_uidnext=1, now=NOW)
    to_old_format(engine)
    assert rows(engine, "SELECT DISTINCT to_addrs FROM messages") == [
        ("Doe, John <alice@example.com>, other@example.com",)
    ]

    assert [m.version for m in migrate(engine)] == [
        m.version for m in migrations.MIGRATIONS if m.version >= 11
    ]

    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("messages")}
        loaded = {uid: message_store.load_message(conn, pk) for uid, pk in pks.items()}
    assert "to_addrs" not in columns and "cc_addrs" not in columns and "address_lists" in columns
    for n, stored in loaded.items():
        assert stored is not None
        assert stored.parsed.from_ == (Address("Sender", f"sender{n}@example.net"),)
        assert stored.parsed.to == (
            Address("Doe, John", "alice@example.com"),
            Address("", "other@example.com"),
        )
        assert stored.parsed.cc == (Address("Jörg", "j@example.org"),)
        assert stored.parsed.reply_to == (Address("Müller, Hans", "hans@example.org"),)
    # What full-text search finds by address is what it found before.
    with reading(engine) as conn:
        assert count(conn, "acct", "to:Doe to:John to:alice@example.com", SearchOptions()) == 5
        assert count(conn, "acct", "hans example.org", SearchOptions()) == 5
    assert migrate(engine) == []
