"""The folders of one account that a worker watches: their leases, their watchers, and the
account's IMAP connections they use.

A folder is watched only by the holder of its lease (``store.folders``). Its watcher IDLEs on a
connection of its own or is polled over the worker's one shared connection; every connection takes
one of the account's slots first (``imap.connection_budget``), so that all workers and containers
together stay within IMAP_MAX_CONNECTIONS. The slots are shared out: with H workers holding the
account's folders, a worker IDLEs on at most ``max_connections // H - 1`` folders (its last slot is
for the shared connection), and gives IDLE connections up, or takes them again, as H changes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta

import structlog
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
from emailops.processes import is_dead_sibling
from emailops.store import connection_slots
from emailops.store import folders as folder_store
from emailops.store.database import reading

log = structlog.get_logger(component="index")

# A folder of a worker that died (and is not replaced) is taken over after at most LEASE_TTL; its
# connection slots are free after as long.
LEASE_TTL = timedelta(seconds=30)
# A sync pass yields after this long (the fetch stops after the batch that passes it, once the
# batches under way are stored), so that a large first sync or reindex holds up other folders'
# new mail no longer; the next pass goes on from there. Batches are smaller than a one-off sync's
# for the same reason (bench/README.md, "Fairness between mailboxes").
PASS_BUDGET_SECONDS = 1.0
FETCH_BATCH_MESSAGES = 100


class AccountWatch:
    def __init__(
        self,
        engine: Engine,
        server: ServerConfig,
        config: SyncConfig,
        *,
        owner: str,
        dead_runs: tuple[str, ...],
        workers: int,
        sign_ins: SignInLimits,
        clock: Clock,
        gate: AccountGate | None = None,
    ) -> None:
        self.engine = engine
        self.server = server
        self.config = config
        self.owner = owner
        self.dead_runs = dead_runs
        self.clock = clock
        self.gate = gate
        self.cache = RawMessageCache(config.cache_dir, config.cache_max_bytes) if config.cache_dir else None
        # Spread folders over workers: nobody holds more than its share while others have none.
        self.max_folders = max(1, math.ceil(len(config.folders) / max(1, workers)))
        self.watchers: dict[str, FolderWatcher] = {}
        self.connections = AccountConnections(
            engine,
            config.account,
            holder=owner,
            max_connections=config.max_connections,
            limits=sign_ins,
            ttl=LEASE_TTL,
        )
        # The connection of the folders polled rather than IDLEd (see SyncConfig.idle_folders).
        self.shared = SharedConnection(server, connector=self.connections.connect)
        self.folder_ids: dict[str, int] = {}
        # Folders IDLEd at most, from this worker's share of the account's connections.
        self.idle_cap = self._idle_cap(holders=1)
        self.log = log.bind(owner=owner, account=config.account)

    def manage_leases(self) -> None:
        """Renew or take folder leases and the connection slots, and share the slots out anew."""
        for folder in self.config.folders:
            self._manage_lease(folder)
        self.connections.renew()
        self._share_connections()

    def release_closed(self) -> None:
        """Give back the slots of connections closed since the last call."""
        clients = [watcher.client for watcher in self.watchers.values()]
        self.connections.release_closed([*clients, self.shared.client])

    def stop_watching(self, folder: str) -> None:
        self.log.warning("lost the lease of a folder to another worker", folder=folder)
        self.watchers.pop(folder).close()
        if not any(watcher.shared is not None for watcher in self.watchers.values()):
            self.shared.close()  # no polled folder left: do not hold one of the account's connections

    def close(self) -> None:
        for folder, watcher in self.watchers.items():
            watcher.close()
            with self.engine.begin() as conn:
                folder_store.release_lease(conn, self.folder_ids[folder], self.owner)
        self.watchers.clear()
        self.shared.close()
        self.connections.close()

    def _manage_lease(self, folder: str) -> None:
        with self.engine.begin() as conn:
            if folder not in self.folder_ids:
                self.folder_ids[folder] = folder_store.ensure_folder(conn, self.config.account, folder).id
            folder_id = self.folder_ids[folder]
            watching = folder in self.watchers
            holder = None if watching else folder_store.lease_owner(conn, folder_id)
            # A worker of this run that died (and was replaced: by this one, maybe) holds nothing.
            replacing = holder if holder and is_dead_sibling(self.owner, holder, self.dead_runs) else None
            over_share = not watching and replacing is None and len(self.watchers) >= self.max_folders
            # Beyond its share a worker takes only a folder nobody has watched for a while
            # (its worker died and was not replaced, e.g. another container is down).
            if over_share and not folder_store.is_orphaned(conn, folder_id, 2 * LEASE_TTL):
                return
            epoch = folder_store.acquire_lease(conn, folder_id, self.owner, LEASE_TTL, replacing=replacing)
        if epoch is not None and not watching:
            self.log.info("watching folder", folder=folder)
            config = replace(
                self.config, fetch_batch_messages=min(self.config.fetch_batch_messages, FETCH_BATCH_MESSAGES)
            )
            sync = FolderSync(self.engine, config, folder, cache=self.cache, clock=self.clock)
            self.watchers[folder] = self._watcher(sync, idle=len(self._idle_folders()) < self.idle_cap)
        if epoch is not None:
            self.watchers[folder].sync.fence = epoch
        elif watching:
            self.stop_watching(folder)

    def _idle_cap(self, holders: int) -> int:
        if not self.config.use_idle:
            return 0
        share = max(1, self.config.max_connections // max(1, holders))
        return min(self.config.idle_folders, share - 1)

    def _idle_folders(self) -> list[str]:
        return [folder for folder, watcher in self.watchers.items() if watcher.shared is None]

    def _share_connections(self) -> None:
        """IDLE on as many folders as this worker's share of the account's connections allows:
        fewer when more workers came (or an IDLE connection found no free slot), more when they
        left and slots are free."""
        with reading(self.engine) as conn:
            self.idle_cap = self._idle_cap(folder_store.lease_holders(conn, self.config.account))
            slots_free = connection_slots.slots_held(conn, self.config.account) < self.config.max_connections
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
