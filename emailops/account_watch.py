"""The folders of one account that a worker watches: their leases, their watchers, and the
account's IMAP connections they use.

A folder is watched only by the holder of its lease (``store.folders``), as the worker's lease
round hands them out (``lease_round``: every account's folders shared between all workers). Its
watcher IDLEs on a connection of its own or is polled over the worker's one shared connection;
every connection takes one of the account's slots first (``imap.connection_budget``), so that
all workers and containers together stay within IMAP_MAX_CONNECTIONS. The slots are shared out:
with H workers holding the account's folders, a worker IDLEs on at most ``max_connections // H - 1``
folders (its last slot is for the shared connection), and gives IDLE connections up, or takes
them again, as H changes.
With ``sessions`` (the worker's mailbox session for the account's rules and outbox, on the same
``AccountConnections``), one slot of the account is left out of the shares for them: a session
takes a slot only while it is used, and is closed here once unused for a while.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import structlog
from imapclient import IMAPClient
from sqlalchemy import Engine

from emailops.cache import RawMessageCache
from emailops.clock import Clock
from emailops.config import ServerConfig, SignInLimits, SyncConfig
from emailops.imap.account_gate import AccountGate
from emailops.imap.connection import SharedConnection
from emailops.imap.connection_budget import AccountConnections
from emailops.imap.errors import ImapNoConnectionSlotError
from emailops.imap.sync import FolderSync
from emailops.imap.watcher import FolderWatcher
from emailops.lease_round import LEASE_TTL
from emailops.store import folders as folder_store

log = structlog.get_logger(component="index")

# A sync pass yields after this long (the fetch stops after the batch that passes it, once the
# batches under way are stored), so that a large first sync or reindex holds up other folders'
# new mail no longer; the next pass goes on from there. Batches are smaller than a one-off sync's
# for the same reason (bench/README.md, "Fairness between mailboxes" and "Many mailboxes at scale").
PASS_BUDGET_SECONDS = 0.5
FETCH_BATCH_MESSAGES = 100


class AccountSession(Protocol):
    """An IMAP session of the account besides the watchers' (``replies.mailbox.MailboxSession``),
    opened with the watch's ``AccountConnections`` when used."""

    @property
    def open_client(self) -> IMAPClient | None: ...

    def close_if_unused(self) -> None: ...

    def close(self) -> None: ...


class AccountWatch:
    def __init__(
        self,
        engine: Engine,
        server: ServerConfig,
        config: SyncConfig,
        *,
        owner: str,
        sign_ins: SignInLimits,
        clock: Clock,
        gate: AccountGate | None = None,
        connections: AccountConnections | None = None,
        sessions: Sequence[AccountSession] = (),
    ) -> None:
        """``connections``: the account's connections in this worker, when ``sessions`` use them
        too (built here when None)."""
        self.engine = engine
        self.server = server
        self.config = config
        self.owner = owner
        self.clock = clock
        self.gate = gate
        self.cache = RawMessageCache(config.cache_dir, config.cache_max_bytes) if config.cache_dir else None
        self.watchers: dict[str, FolderWatcher] = {}
        self.connections = connections or AccountConnections(
            engine,
            config.account,
            holder=owner,
            max_connections=config.max_connections,
            limits=sign_ins,
            ttl=LEASE_TTL,
        )
        self.sessions = list(sessions)
        # The connection of the folders polled rather than IDLEd (see SyncConfig.idle_folders).
        self.shared = SharedConnection(server, connector=self.connections.connect)
        self.folder_ids: dict[str, int] = {}
        # Folders IDLEd at most, from this worker's share of the account's connections.
        self.idle_cap = self._idle_cap(holders=1)
        self.log = log.bind(owner=owner, account=config.account)

    def hold(
        self,
        leases: dict[str, tuple[int, int]],
        *,
        given_up: set[str],
        holders: int,
        slots_held: int,
        own_slots: set[int],
    ) -> None:
        """The lease round's outcome: the folders this worker holds (name: id and lease epoch),
        those it gave up to another worker, how many workers hold the account's folders, how many
        of its connection slots are held (by anyone) and which of this worker's are still its own.
        Watchers are started, fenced with their epoch, or closed; the slots are shared out anew."""
        for folder in [folder for folder in self.watchers if folder not in leases]:
            if folder in given_up:
                self.log.info("gave a folder up to another worker (its share)", folder=folder)
            else:
                self.log.warning("lost the lease of a folder to another worker", folder=folder)
            self._stop(folder)
        # In the configured order: the first folders are the ones IDLEd (``idle_folders``).
        for folder in [folder for folder in self.config.folders if folder in leases]:
            folder_id, epoch = leases[folder]
            self.folder_ids[folder] = folder_id
            if folder not in self.watchers:
                self.log.info("watching folder", folder=folder)
                config = replace(
                    self.config,
                    fetch_batch_messages=min(self.config.fetch_batch_messages, FETCH_BATCH_MESSAGES),
                )
                sync = FolderSync(self.engine, config, folder, cache=self.cache, clock=self.clock)
                self.watchers[folder] = self._watcher(sync, idle=len(self._idle_folders()) < self.idle_cap)
            self.watchers[folder].sync.fence = epoch
        self.connections.check_held(own_slots)
        self._share_connections(holders, slots_held)

    def watched_ids(self) -> list[int]:
        """The index ids of the folders watched now."""
        return [self.folder_ids[folder] for folder in self.watchers]

    def release_closed(self) -> None:
        """Close the sessions unused for a while, and give back the slots of connections closed
        since the last call."""
        for session in self.sessions:
            session.close_if_unused()
        clients = [watcher.client for watcher in self.watchers.values()]
        sessions = [session.open_client for session in self.sessions]
        self.connections.release_closed([*clients, self.shared.client, *sessions])

    def stop_watching(self, folder: str) -> None:
        """The folder's lease was lost (a sync found it fenced off)."""
        self.log.warning("lost the lease of a folder to another worker", folder=folder)
        self._stop(folder)

    def _stop(self, folder: str) -> None:
        self.watchers.pop(folder).close()
        if not any(watcher.shared is not None for watcher in self.watchers.values()):
            self.shared.close()  # no polled folder left: do not hold one of the account's connections

    def close(self) -> None:
        for watcher in self.watchers.values():
            watcher.close()
        with self.engine.begin() as conn:
            for folder in self.watchers:
                folder_store.release_lease(conn, self.folder_ids[folder], self.owner)
        self.watchers.clear()
        self.shared.close()
        for session in self.sessions:
            session.close()
        self.connections.close()

    def _idle_cap(self, holders: int) -> int:
        if not self.config.use_idle:
            return 0
        # The sessions' slot (one: they take it in turn, closed when unused) is no worker's share.
        shared_out = self.config.max_connections - (1 if self.sessions else 0)
        share = max(1, shared_out // max(1, holders))
        return min(self.config.idle_folders, share - 1)

    def _idle_folders(self) -> list[str]:
        return [folder for folder, watcher in self.watchers.items() if watcher.shared is None]

    def _share_connections(self, holders: int, slots_held: int) -> None:
        """IDLE on as many folders as this worker's share of the account's connections allows:
        fewer when more workers came (or an IDLE connection found no free slot), more when they
        left and slots are free."""
        self.idle_cap = self._idle_cap(holders)
        slots_free = slots_held < self.config.max_connections
        idle = self._idle_folders()
        for folder in idle[self.idle_cap :]:
            self._replace(folder, idle=False)
        for folder in idle[: self.idle_cap]:
            watcher = self.watchers[folder]
            if not watcher.connected and isinstance(watcher.last_error, ImapNoConnectionSlotError):
                self._replace(folder, idle=False)
        polled = [folder for folder, watcher in self.watchers.items() if watcher.shared is not None]
        if polled and slots_free and len(self._idle_folders()) < self.idle_cap:
            self._replace(polled[0], idle=True)

    def _replace(self, folder: str, *, idle: bool) -> None:
        old = self.watchers[folder]
        old.close()
        self.log.info("watching folder anew", folder=folder, idle=idle, idle_cap=self.idle_cap)
        self.watchers[folder] = self._watcher(old.sync, idle=idle)
        if not any(watcher.shared is not None for watcher in self.watchers.values()):
            self.shared.close()

    def _watcher(self, sync: FolderSync, *, idle: bool) -> FolderWatcher:
        return FolderWatcher(
            self.server,
            self.config,
            sync,
            connector=self.connections.connect,
            shared=None if idle and self.config.use_idle else self.shared,
            pass_budget_seconds=PASS_BUDGET_SECONDS,
            connect_in_background=True,
            gate=self.gate,
        )
