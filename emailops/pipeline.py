"""The mail pipeline one worker runs: watch the folders it holds leases on, index what arrives.

``MailPipeline.run_once()`` is one bounded iteration (about a second): renew or take folder leases,
let each watched folder wait for and index changes, then hand newly indexed messages to the
after-index stages (rules, outbox) given to it. The database coordinates N workers or containers:
a folder is watched only by the holder of its lease, and a dead worker's lease expires.
"""

from __future__ import annotations

import math
import selectors
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

import structlog
from sqlalchemy import Engine

from emailops.accounts.gate import AccountGate
from emailops.cache import RawMessageCache
from emailops.clock import Clock, utc_now
from emailops.config import ServerConfig, SyncConfig
from emailops.imap.connection import SharedConnection
from emailops.imap.sync import FolderSync
from emailops.imap.watcher import FolderStatus, FolderWatcher
from emailops.processes import is_dead_sibling
from emailops.store import folders as folder_store

if TYPE_CHECKING:
    from emailops.replies.smtp_sender import SmtpSender, SmtpSignInStatus

log = structlog.get_logger(component="index")

# A folder of a worker that died (and is not replaced) is taken over after at most LEASE_TTL.
LEASE_TTL = timedelta(seconds=30)
LEASE_RENEW_SECONDS = 10.0
# How often a worker looks for the operator's "fetch now" requests of the folders it watches.
FETCH_REQUEST_CHECK_SECONDS = 2.0


class AfterIndexStage(Protocol):
    """Work done after indexing in the same worker (rules, outbox delivery); bounded per call."""

    def run_once(self) -> bool:
        """Do what is due, for about a second at most; True if there was work (maybe more)."""
        ...

    def close(self) -> None: ...


class MailPipeline:
    def __init__(
        self,
        engine: Engine,
        server: ServerConfig,
        config: SyncConfig,
        *,
        owner: str,
        dead_runs: tuple[str, ...] = (),
        workers: int = 1,
        stages: Sequence[AfterIndexStage] = (),
        smtp: SmtpSender | None = None,
        gate: AccountGate | None = None,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        step_seconds: float = 1.0,
    ) -> None:
        self.engine = engine
        self.server = server
        self.config = config
        self.owner = owner
        # Runs of this host known to be over (see processes.is_dead_sibling): their leases are free.
        self.dead_runs = dead_runs
        self.stages = list(stages)
        # The outbox stage's sender, whose sign-ins smtp_status() reports (None: no outbox here).
        self.smtp = smtp
        # The account's state (account_state), shared by its watchers; None: each on its own.
        self.gate = gate
        self.clock = clock
        self.monotonic = monotonic
        self.step_seconds = step_seconds
        self.cache = RawMessageCache(config.cache_dir, config.cache_max_bytes) if config.cache_dir else None
        # Spread folders over workers: nobody holds more than its share while others have none.
        self.max_folders = max(1, math.ceil(len(config.folders) / max(1, workers)))
        self.watchers: dict[str, FolderWatcher] = {}
        # The connection of the folders polled rather than IDLEd (see SyncConfig.idle_folders).
        self.shared = SharedConnection(server)
        self.folder_ids: dict[str, int] = {}
        self.next_lease_check = 0.0
        self.next_fetch_request_check = 0.0
        self.stages_busy = False
        self.log = log.bind(owner=owner)

    def run_once(self) -> None:
        if self.monotonic() >= self.next_lease_check:
            self._manage_leases()
            self.next_lease_check = self.monotonic() + LEASE_RENEW_SECONDS
        if self.watchers and self.monotonic() >= self.next_fetch_request_check:
            self._take_fetch_requests()
            self.next_fetch_request_check = self.monotonic() + FETCH_REQUEST_CHECK_SECONDS
        # While the stages have work left, nobody waits for mail: the watchers only look.
        wait = 0.0 if self.stages_busy else self.step_seconds
        if self.watchers:
            self._wait_for_mail(wait)
            for folder, watcher in list(self.watchers.items()):
                try:
                    watcher.step(0.0)
                except folder_store.LeaseLostError:
                    self._stop_watching(folder)
        elif wait:
            time.sleep(wait)
        self.stages_busy = any([stage.run_once() for stage in self.stages])

    def _wait_for_mail(self, seconds: float) -> None:
        """Wait up to ``seconds`` until a server pushes on any IDLE connection, or a watcher is due.

        All IDLE sockets are waited on at once: a push on one of N folders is not held up by the
        others' waits. A socket the server closed is readable at once, and its watcher drops it."""
        sockets = []
        for watcher in self.watchers.values():
            sock, due_in = watcher.wait_target()
            seconds = min(seconds, due_in)
            if sock is not None:
                sockets.append(sock)
        if seconds <= 0:
            return
        if not sockets:
            time.sleep(seconds)
            return
        with selectors.DefaultSelector() as selector:
            for sock in sockets:
                selector.register(sock, selectors.EVENT_READ)
            selector.select(seconds)

    def status(self) -> list[FolderStatus]:
        """What each folder this worker watches last saw (for the operator's view and health)."""
        return [watcher.status() for watcher in self.watchers.values()]

    def smtp_status(self) -> SmtpSignInStatus | None:
        """Whether the SMTP server refuses the account's sign-in (for the operator and health)."""
        return None if self.smtp is None else self.smtp.sign_in_status()

    def close(self) -> None:
        for folder, watcher in self.watchers.items():
            watcher.close()
            with self.engine.begin() as conn:
                folder_store.release_lease(conn, self.folder_ids[folder], self.owner)
        self.watchers.clear()
        self.shared.close()
        for stage in self.stages:
            stage.close()

    def _manage_leases(self) -> None:
        for folder in self.config.folders:
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
                    continue
                epoch = folder_store.acquire_lease(
                    conn, folder_id, self.owner, LEASE_TTL, replacing=replacing
                )
            if epoch is not None and not watching:
                self.log.info("watching folder", folder=folder)
                self.watchers[folder] = self._watcher(folder)
            if epoch is not None:
                self.watchers[folder].sync.fence = epoch
            elif watching:
                self._stop_watching(folder)

    def _take_fetch_requests(self) -> None:
        with self.engine.begin() as conn:
            asked = folder_store.take_fetch_requests(conn, self.config.account, list(self.watchers))
        for folder in asked:
            self.log.info("syncing the folder now, as the operator asked", folder=folder)
            self.watchers[folder].request_sync()

    def _stop_watching(self, folder: str) -> None:
        self.log.warning("lost the lease of a folder to another worker", folder=folder)
        self.watchers.pop(folder).close()
        if not any(watcher.shared is not None for watcher in self.watchers.values()):
            self.shared.close()  # no polled folder left: do not hold one of the account's connections

    def _watcher(self, folder: str) -> FolderWatcher:
        sync = FolderSync(self.engine, self.config, folder, cache=self.cache, clock=self.clock)
        idle_watchers = sum(1 for watcher in self.watchers.values() if watcher.shared is None)
        if self.config.use_idle and idle_watchers < self.config.idle_folders:
            return FolderWatcher(self.server, self.config, sync, gate=self.gate)
        return FolderWatcher(self.server, self.config, sync, shared=self.shared, gate=self.gate)
