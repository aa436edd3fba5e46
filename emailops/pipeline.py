"""The mail pipeline one worker runs: watch the folders it holds leases on, index what arrives.

``MailPipeline.run_once()`` is one bounded iteration (about a second): renew or take folder leases,
let each watched folder wait for and index changes, then hand newly indexed messages to the
after-index stages (rules, outbox) given to it. The database coordinates N workers or containers:
a folder is watched only by the holder of its lease, and a dead worker's lease expires.

One worker may watch the folders of several accounts (``accounts``), each with its own connection
budget (``account_watch``). No mailbox holds up another's new mail: all IDLE sockets are waited on
at once, connections are opened on threads (a server that does not answer holds up only its own
folders), and a folder catching up (a first sync, a reindex) gets one bounded pass per iteration,
after every other folder had its turn.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import structlog
from sqlalchemy import Engine

from emailops.account_watch import AccountSession, AccountWatch
from emailops.clock import Clock, utc_now
from emailops.config import ServerConfig, SignInLimits, SyncConfig
from emailops.imap.account_gate import AccountGate
from emailops.imap.connection_budget import AccountConnections
from emailops.imap.watcher import FolderStatus, FolderWatcher
from emailops.lease_round import LEASE_TTL as LEASE_TTL
from emailops.lease_round import LeaseRound
from emailops.store import folders as folder_store

if TYPE_CHECKING:
    from emailops.replies.smtp_sender import SmtpSender, SmtpSignInStatus

log = structlog.get_logger(component="index")

LEASE_RENEW_SECONDS = 5.0
# How often a worker looks for the operator's "fetch now" requests of the folders it watches.
FETCH_REQUEST_CHECK_SECONDS = 2.0
# The folders' steps of one iteration stop after this long (``_step_watchers``).
STEPS_BUDGET_SECONDS = 2.0


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
        stages: Sequence[AfterIndexStage] = (),
        smtp: SmtpSender | None = None,
        gate: AccountGate | None = None,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        step_seconds: float = 1.0,
        accounts: Sequence[tuple[ServerConfig, SyncConfig]] = (),
        sign_ins: SignInLimits | None = None,
        connections: AccountConnections | None = None,
        sessions: Sequence[AccountSession] = (),
    ) -> None:
        """Watches the folders of ``config``'s account on ``server``, and of each further
        ``(server, config)`` of ``accounts``. ``connections`` and ``sessions``: the first
        account's, as for ``add_account``."""
        self.engine = engine
        self.server = server
        self.config = config
        self.owner = owner
        self.stages = list(stages)
        # The outbox stage's sender, whose sign-ins smtp_status() reports (None: no outbox here).
        self.smtp = smtp
        self.monotonic = monotonic
        self.step_seconds = step_seconds
        self.sign_ins = sign_ins or SignInLimits()
        self.clock = clock
        self.leases = LeaseRound(engine, owner, dead_runs)
        self.accounts = [self._watch(server, config, gate, connections, sessions)] + [
            self._watch(account_server, account_config, gate) for account_server, account_config in accounts
        ]
        # The stages and SMTP sender given with add_account, closed by remove_account.
        self.account_parts: dict[str, tuple[list[AfterIndexStage], SmtpSender | None]] = {}
        self.next_lease_check = 0.0
        self.next_fetch_request_check = 0.0
        self.stages_busy = False
        # Which of the folders catching up has the next pass (round robin).
        self.catch_up_turn = 0
        # Where the next iteration's steps start, after an iteration that ran out of time.
        self.step_turn = 0
        self.log = log.bind(owner=owner)

    def _watch(
        self,
        server: ServerConfig,
        config: SyncConfig,
        gate: AccountGate | None,
        connections: AccountConnections | None = None,
        sessions: Sequence[AccountSession] = (),
    ) -> AccountWatch:
        return AccountWatch(
            self.engine,
            server,
            config,
            owner=self.owner,
            sign_ins=self.sign_ins,
            clock=self.clock,
            # The account's state, shared by all its watchers (None: each on its own).
            gate=None if gate is None else gate.for_account(config.account),
            connections=connections,
            sessions=sessions,
        )

    def add_account(
        self,
        server: ServerConfig,
        config: SyncConfig,
        *,
        gate: AccountGate | None = None,
        stages: Sequence[AfterIndexStage] = (),
        smtp: SmtpSender | None = None,
        connections: AccountConnections | None = None,
        sessions: Sequence[AccountSession] = (),
    ) -> None:
        """Watch one more account's folders (from the next lease check), and run its stages.
        ``sessions``: the stages' IMAP sessions, opened with ``connections`` (the account's
        connections in this worker, then shared with its watchers: ``AccountWatch``)."""
        self.accounts.append(self._watch(server, config, gate, connections, sessions))
        self.account_parts[config.account] = (list(stages), smtp)
        self.stages.extend(stages)
        self.smtp = self.smtp or smtp
        self.next_lease_check = 0.0

    def remove_account(self, account: str) -> None:
        """Stop watching an account: its watchers are closed and its folder leases released; the
        stages and sender given with ``add_account`` are closed."""
        for watch in [watch for watch in self.accounts if watch.config.account == account]:
            self.accounts.remove(watch)
            watch.close()
        stages, smtp = self.account_parts.pop(account, ([], None))
        for stage in stages:
            self.stages.remove(stage)
            stage.close()
        if smtp is not None and smtp is self.smtp:
            self.smtp = next((sender for _, sender in self.account_parts.values() if sender), None)

    @property
    def watchers(self) -> dict[str, FolderWatcher]:
        """The watched folders of the first account (the only one of a one-account worker)."""
        return self.accounts[0].watchers if self.accounts else {}

    def run_once(self) -> None:
        if self.monotonic() >= self.next_lease_check:
            self.leases.run(self.accounts)
            self.next_lease_check = self.monotonic() + LEASE_RENEW_SECONDS
        if self.monotonic() >= self.next_fetch_request_check:
            self._take_fetch_requests()
            self.next_fetch_request_check = self.monotonic() + FETCH_REQUEST_CHECK_SECONDS
        # While the stages have work left, nobody waits for mail: the watchers only look.
        wait = 0.0 if self.stages_busy else self.step_seconds
        if any(account.watchers for account in self.accounts):
            self._wait_for_mail(wait)
            self._step_watchers()
        elif wait:
            time.sleep(wait)
        for account in self.accounts:
            account.release_closed()
        # A copy: a stage may add or remove accounts (and their stages).
        self.stages_busy = any([stage.run_once() for stage in list(self.stages)])

    def _step_watchers(self) -> None:
        """Every folder looks for new mail (and syncs it); then one folder that is catching up
        gets one pass, in turn: a large first sync holds up nobody's new mail.

        The folders' steps stop for this iteration once they took ``STEPS_BUDGET_SECONDS`` (many
        folders connected at once each sync on their first step), and the next iteration starts
        with the folders left: the leases are renewed and the stages run meanwhile."""
        catching_up: list[tuple[AccountWatch, str, FolderWatcher]] = []
        due: list[tuple[AccountWatch, str, FolderWatcher]] = []
        for account in self.accounts:
            for folder, watcher in list(account.watchers.items()):
                if watcher.catching_up and watcher.connected:
                    catching_up.append((account, folder, watcher))
                else:
                    due.append((account, folder, watcher))
        started = self.monotonic()
        start = self.step_turn % len(due) if due else 0
        for taken, entry in enumerate(due[start:] + due[:start]):
            if self.monotonic() - started >= STEPS_BUDGET_SECONDS:
                self.step_turn = start + taken
                return
            self._step(*entry)
        self.step_turn = 0
        if catching_up:
            self.catch_up_turn = (self.catch_up_turn + 1) % len(catching_up)
            self._step(*catching_up[self.catch_up_turn])

    @staticmethod
    def _step(account: AccountWatch, folder: str, watcher: FolderWatcher) -> None:
        try:
            watcher.step(0.0)
        except folder_store.LeaseLostError:
            account.stop_watching(folder)

    def _wait_for_mail(self, seconds: float) -> None:
        """Wait up to ``seconds`` until a server pushes on any IDLE connection, a connection being
        opened is ready, or a watcher is due.

        All sockets are waited on at once: a push on one of N folders is not held up by the
        others' waits. A socket the server closed is readable at once, and its watcher drops it."""
        sockets: set[socket.socket] = set()
        for account in self.accounts:
            for watcher in account.watchers.values():
                sock, due_in = watcher.wait_target()
                seconds = min(seconds, due_in)
                if sock is not None:
                    sockets.add(sock)
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
        return [watcher.status() for account in self.accounts for watcher in account.watchers.values()]

    def smtp_status(self) -> SmtpSignInStatus | None:
        """Whether the SMTP server refuses the account's sign-in (for the operator and health)."""
        return None if self.smtp is None else self.smtp.sign_in_status()

    def close(self) -> None:
        for account in self.accounts:
            account.close()
        self.leases.leave()
        for stage in self.stages:
            stage.close()

    def _take_fetch_requests(self) -> None:
        """The operator's "fetch now" of any folder this worker watches, in one statement."""
        watched = {
            account.folder_ids[folder]: (account, folder)
            for account in self.accounts
            for folder in account.watchers
        }
        if not watched:
            return
        with self.engine.begin() as conn:
            asked = folder_store.take_fetch_requests(conn, watched)
        for folder_id in asked:
            account, folder = watched[folder_id]
            self.log.info(
                "syncing the folder now, as the operator asked", folder=folder, account=account.config.account
            )
            account.watchers[folder].request_sync()
