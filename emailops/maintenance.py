"""Operator tasks on the index: catch up once, rebuild from IMAP, back up SQLite while running."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import structlog
from imapclient import IMAPClient
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.engine import make_url
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from emailops.cache import RawMessageCache
from emailops.config import ServerConfig, SyncConfig
from emailops.imap.connection import connect, logout_quietly
from emailops.imap.errors import ImapFolderMissingError, ImapTransientError
from emailops.imap.folder_status import SyncReport
from emailops.imap.sync import FolderSync
from emailops.store import fulltext
from emailops.store.database import create_private_file
from emailops.store.folders import LiveLease, live_lease
from emailops.store.schema import folders, messages

log = structlog.get_logger(component="index")


def connect_with_retries(server: ServerConfig, attempts: int = 4) -> IMAPClient:
    """For one-shot commands: a few quick retries of transient failures, then the error."""
    for attempt in Retrying(
        retry=retry_if_exception_type(ImapTransientError),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.5, max=5),
        reraise=True,
    ):
        with attempt:
            return connect(server)
    raise AssertionError("unreachable: tenacity re-raises the last error")


def sync_once(
    engine: Engine,
    server: ServerConfig,
    config: SyncConfig,
    *,
    connector: Callable[[ServerConfig], IMAPClient] = connect_with_retries,
) -> list[SyncReport]:
    """Catch up on every configured folder once, with a full reconcile."""
    cache = RawMessageCache(config.cache_dir, config.cache_max_bytes) if config.cache_dir else None
    client = connector(server)
    reports: list[SyncReport] = []
    try:
        for folder in config.folders:
            try:
                reports.append(FolderSync(engine, config, folder, cache=cache).sync(client, reconcile=True))
            except ImapFolderMissingError as exc:  # the other folders are still synced
                log.error(
                    "folder does not exist on the server; check EMAIL_FOLDERS", folder=folder, error=str(exc)
                )
                reports.append(SyncReport(folder, complete=False, missing=True))
        return reports
    finally:
        logout_quietly(client)


class IndexInUseError(Exception):
    """A daemon holds a folder lease of the account: clearing the index under it would race its
    sync, so nothing was changed."""

    def __init__(self, lease: LiveLease) -> None:
        super().__init__(
            f"{lease.owner} holds folder {lease.folder!r} until {lease.expires_at:%Y-%m-%d %H:%M:%S}"
        )
        self.lease = lease


def clear_index(engine: Engine, account: str) -> int:
    """Forget every indexed message of ``account`` and its folders' sync state; return how many.

    The outbox stays: it is the memory of what was answered. A later sync takes the mail that is in
    the folders then as already there (history), so a rebuild never answers old mail. Refused
    (``IndexInUseError``, nothing changed) while a daemon holds a lease of the account.
    """
    with engine.begin() as conn:
        lease = live_lease(conn, account)
        if lease is not None:
            raise IndexInUseError(lease)
        folder_ids = list(conn.execute(select(folders.c.id).where(folders.c.account == account)).scalars())
        removed = conn.execute(delete(messages).where(messages.c.folder_id.in_(folder_ids))).rowcount
        conn.execute(
            update(folders)
            .where(folders.c.account == account)
            .values(
                uidvalidity=None,
                uidnext=None,
                highestmodseq=None,
                baseline_uidnext=None,
                first_synced_at=None,
                last_sync_at=None,
                last_reconcile_at=None,
            )
        )
        fulltext.rebuild(conn)
    log.info("index cleared for rebuild", account=account, messages=removed)
    return removed


def reindex(
    engine: Engine,
    server: ServerConfig,
    config: SyncConfig,
    *,
    connector: Callable[[ServerConfig], IMAPClient] = connect_with_retries,
) -> list[SyncReport]:
    """Rebuild the index from IMAP (raw messages come from the cache where it has them).

    Refused while a daemon watches the account (``IndexInUseError``). The IMAP connection is opened
    before anything is cleared: an unreachable server leaves the index as it was.
    """
    client = connector(server)
    try:
        clear_index(engine, config.account)
        return sync_once(engine, server, config, connector=lambda _server: client)
    finally:
        logout_quietly(client)


class BackupError(Exception):
    pass


def backup_sqlite(database_url: str, target: Path) -> int:
    """A consistent copy of the SQLite index, safe while the daemon writes (SQLite's online backup
    API copies a snapshot, WAL included). Returns the copy's size in bytes. The copy is a new file
    readable by its owner only (0600), as the index the project creates."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        raise BackupError("emailops backup copies a SQLite index; back PostgreSQL up with pg_dump")
    source_path = Path(url.database)
    if not source_path.is_file():
        raise BackupError(f"no index at {source_path}")
    target = target.resolve()
    if target == source_path.resolve():
        raise BackupError("the backup would overwrite the index itself")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    create_private_file(partial)
    source = sqlite3.connect(source_path, timeout=30)
    try:
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy, pages=4096)
            result = copy.execute("PRAGMA integrity_check").fetchone()
            if result is None or result[0] != "ok":
                raise BackupError(f"the copy failed its integrity check: {result}")
        finally:
            copy.close()
    finally:
        source.close()
    partial.replace(target)
    return target.stat().st_size
