"""Shared builders for the index tests: configs pointing at a local IMAP server, simple messages."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import DBAPIError

from emailops.config import ServerConfig, SyncConfig, TlsSecurity
from emailops.store.database import create_index_engine
from emailops.store.migrations import migrate
from emailops.store.schema import folders, messages
from localmail.imap_server import LocalImapServer

ALICE = "alice@example.test"
ACCOUNT = "alice@example.test@127.0.0.1"


def imap_config(server: LocalImapServer, user: str = ALICE, **overrides: object) -> ServerConfig:
    values: dict[str, object] = {
        "host": server.host,
        "port": server.imap_port,
        "username": user,
        "password": server.password(user),
        "security": TlsSecurity.NONE,
        "timeout_seconds": 10.0,
    }
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


def sync_config(tmp_path: Path | None = None, **overrides: object) -> SyncConfig:
    values: dict[str, object] = {"account": ACCOUNT, "poll_interval_seconds": 0.5}
    if tmp_path is not None:
        values["cache_dir"] = tmp_path / "cache"
    values.update(overrides)
    return SyncConfig(**values)  # type: ignore[arg-type]


def index_engine(url: str) -> Engine:
    engine = create_index_engine(url)
    migrate(engine)
    return engine


def message(
    n: int, *, subject: str | None = None, body: str | None = None, message_id: str | None = None
) -> bytes:
    return (
        f"From: Sender {n} <sender{n}@example.org>\r\n"
        f"To: {ALICE}\r\n"
        f"Subject: {subject or f'note {n}'}\r\n"
        f"Message-ID: {message_id or f'<note-{n}@example.org>'}\r\n"
        "Date: Tue, 2 Jan 2024 10:00:00 +0000\r\n"
        "\r\n"
        f"{body or f'body of note {n} token{n}x'}\r\n"
    ).encode()


def indexed_at(engine: Engine, subject: str) -> datetime:
    """When the message with ``subject`` was written to the index (the indexing process's clock)."""
    with engine.connect() as conn:
        moment: datetime = conn.execute(
            select(messages.c.indexed_at).where(messages.c.subject == subject)
        ).scalar_one()
    return moment


def rows(engine: Engine, sql: str) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql)).all()]


def first_synced(url: str, folders_count: int = 1) -> bool:
    """Whether a daemon on the index at ``url`` finished the first sync of ``folders_count``
    folders. Mail delivered from then on is new mail, which the rules answer; mail there before a
    folder's first sync is history, and a daemon is healthy before that sync (it connects on a
    thread, after its start-up jitter)."""
    engine = create_index_engine(url)
    try:
        with engine.connect() as conn:
            synced = conn.execute(
                select(func.count()).select_from(folders).where(folders.c.first_synced_at.is_not(None))
            ).scalar_one()
    except DBAPIError:
        return False  # the daemon has not made the index's tables yet
    finally:
        engine.dispose()
    return int(synced) >= folders_count


def daemon_env(server: LocalImapServer, data: Path, **overrides: str) -> dict[str, str]:
    """Environment for ``python -m emailops`` / ``prod.run`` against ``server``, state under ``data``."""
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith(("EMAIL_", "SENTRY_"))}
    env.update(
        {
            "EMAIL_IMAP_HOST": server.host,
            "EMAIL_IMAP_PORT": str(server.imap_port),
            "EMAIL_IMAP_SECURITY": "none",
            "EMAIL_SMTP_HOST": "127.0.0.1",
            "EMAIL_SMTP_PORT": "2525",
            "EMAIL_SMTP_SECURITY": "none",
            "EMAIL_USERNAME": ALICE,
            "EMAIL_PASSWORD": server.password(ALICE),
            "INDEX_DB_URL": f"sqlite:///{data / 'emailops.db'}",
            "STATE_DIR": str(data / "state"),
            "CACHE_DIR": str(data / "cache"),
            "LOG_FILE_PATH": str(data / "logs" / "app.log"),
            "RULES_FILE": str(data / "rules.toml"),
            "ENV": "test",
        }
    )
    env.update(overrides)
    return env


def age_leases(engine: Engine, by: timedelta) -> None:
    """Move every lease and sync time ``by`` into the past, as if that much time went by."""
    with engine.begin() as conn:
        times = conn.execute(select(folders.c.id, folders.c.lease_expires_at, folders.c.last_sync_at)).all()
        for folder_id, expires, synced in times:
            conn.execute(
                update(folders)
                .where(folders.c.id == folder_id)
                .values(
                    lease_expires_at=expires - by if expires else None,
                    last_sync_at=synced - by if synced else None,
                )
            )
