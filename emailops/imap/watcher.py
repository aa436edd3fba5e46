"""Watching one folder: IDLE on a connection of its own when offered, polling otherwise (on a
connection of its own, or on one shared with other polled folders), reconnecting.

``FolderWatcher.step(max_wait)`` is one bounded iteration for a worker loop: it returns within about
``max_wait`` seconds plus the time of one sync pass (itself bounded by ``pass_budget_seconds``), so
the worker can heartbeat and notice a stop request between steps. It never raises for a server or
network failure: the connection is dropped and re-opened later by the reconnect policy.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from imapclient import IMAPClient

from emailops import metrics
from emailops.config import ServerConfig, SyncConfig
from emailops.imap.account_gate import RECHECK_SECONDS, AccountGate
from emailops.imap.announcements import PendingInput, forget_unsolicited, pending_input
from emailops.imap.background_connect import ConnectAttempt
from emailops.imap.connection import ReconnectPolicy, SharedConnection, connect, logout_quietly
from emailops.imap.errors import (
    CONNECTION_ERRORS,
    ImapAuthError,
    ImapError,
    ImapFolderMissingError,
    ImapNoConnectionSlotError,
    ImapSecurityError,
    ImapTransientError,
)
from emailops.imap.folder_status import SyncReport
from emailops.imap.imaplib_internals import finish_idle_done, send_idle_done
from emailops.imap.sync import FolderSync

log = structlog.get_logger(component="imap")

# A refused OAuth2 sign-in is tried again at least this often (not after up to an hour, as a
# refused password is), so that the daemon resumes soon after `emailops auth login`; the token
# endpoint is not asked more often for it (the token source backs off in the database).
OAUTH2_AUTH_RETRY_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class FolderStatus:
    """What a watcher last saw, for the operator (UNIX times; ``error_kind`` is ``ImapError.kind``).

    The error is the last failure, kept after a later success: it is current while ``error_at`` is
    after ``last_sync_at`` (or there was no sync)."""

    folder: str
    last_sync_at: float | None
    error_kind: str | None = None
    error: str | None = None
    error_at: float | None = None
    # How it is watched now: "idle" (the server pushes), "polling", or None (not connected).
    mode: str | None = None
    # The account's key in the index (a worker watches the folders of several accounts; None in
    # a report written before it said so).
    account: str | None = None


class FolderWatcher:
    def __init__(
        self,
        server: ServerConfig,
        config: SyncConfig,
        folder_sync: FolderSync,
        *,
        connector: Callable[[ServerConfig], IMAPClient] = connect,
        shared: SharedConnection | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
        pass_budget_seconds: float = 5.0,
        gate: AccountGate | None = None,
        connect_in_background: bool = False,
    ) -> None:
        self.server = server
        self.config = config
        self.sync = folder_sync
        self.folder = folder_sync.folder
        self.connector = connector
        # With a shared connection the folder is polled, never IDLEd (IDLE would hold it).
        self.shared = shared
        self.monotonic = monotonic
        self.sleep = sleep
        self.pass_budget_seconds = pass_budget_seconds
        # A worker loop serving many folders connects on a thread (``background_connect``), so that
        # a server that does not answer holds up only its own folders.
        self.connect_in_background = connect_in_background
        self.connecting: ConnectAttempt | None = None
        self.policy = ReconnectPolicy()
        # The account's state shared by all its watchers; without one, this watcher's own policy.
        self.gate = gate
        self.client: IMAPClient | None = None
        self.idling = False
        # DONE was sent to end IDLE (monotonic time), and its answer is awaited without blocking
        # the worker's loop: a server that stopped answering holds up only its own folder.
        self.done_sent_at: float | None = None
        self.reconcile_after_done = False
        self.failures = 0
        self.next_connect_at = 0.0
        self.next_poll_at = 0.0
        self.next_reconcile_at = 0.0
        self.idle_started_at = 0.0
        self.catching_up = False
        self.wall_clock = wall_clock
        self.last_sync_at: float | None = None
        self.last_error: ImapError | None = None
        self.last_error_at: float | None = None
        self.log = log.bind(folder=self.folder, account=config.account)

    @property
    def connected(self) -> bool:
        return self.client is not None

    def step(self, max_wait: float) -> SyncReport | None:
        """One iteration: connect if due, then wait for a change (IDLE) or the next poll, and sync."""
        now = self.monotonic()
        if self.shared is not None and self.client is not None and self.client is not self.shared.client:
            self.client = None  # another folder found the shared connection broken and dropped it
        if self.client is None:
            if now < self.next_connect_at:
                self.sleep(min(max_wait, self.next_connect_at - now))
                return None
            # An attempt under way on its thread was already let through by the account's gate.
            gate = self.gate if self.connecting is None else None
            account_wait = gate.wait_seconds() if gate is not None else 0.0
            if account_wait > 0:
                self.next_connect_at = now + account_wait
                return None
            if not self._connect():
                return None
            return self._sync(reconcile=True)
        try:
            if self.done_sent_at is not None:
                return self._done_step(now)
            if self.catching_up:
                return self._sync(reconcile=False)
            if self.idling:
                return self._idle_step(max_wait)
            if now < self.next_poll_at:
                self.sleep(min(max_wait, self.next_poll_at - now))
                return None
            return self._sync(reconcile=now >= self.next_reconcile_at)
        except CONNECTION_ERRORS as exc:
            self._drop(ImapTransientError(f"{type(exc).__name__}: {exc}"))
            return None

    def request_sync(self) -> None:
        """Sync at the next step (the operator's "fetch now"), not at the next poll or push; a
        connection waiting to be retried is tried at once, once."""
        self.catching_up = True
        self.next_connect_at = 0.0

    def wait_target(self) -> tuple[socket.socket | None, float]:
        """What a worker may wait on before this watcher's next step: the socket of its IDLE
        connection (None when not idling), and the seconds after which the step is due anyway.

        A worker watching several folders waits on all their sockets at once, so that a push on any
        of them is handled at once (see ``MailPipeline``)."""
        now = self.monotonic()
        if self.client is None and self.connecting is not None:
            return self.connecting.ready_socket(), self.server.timeout_seconds
        if self.client is None:
            return None, self.next_connect_at - now
        if self.done_sent_at is not None:
            if pending_input(self.client) is not PendingInput.NOTHING:
                return None, 0.0
            return self.client.socket(), self.done_sent_at + self.server.timeout_seconds - now
        if self.catching_up or (self.shared is not None and self.client is not self.shared.client):
            return None, 0.0
        if not self.idling:
            return None, self.next_poll_at - now
        if pending_input(self.client) is not PendingInput.NOTHING:
            return None, 0.0
        renew_at = self.idle_started_at + self.config.idle_renew_seconds
        return self.client.socket(), min(renew_at, self.next_poll_at) - now

    def status(self) -> FolderStatus:
        error = self.last_error
        return FolderStatus(
            folder=self.folder,
            last_sync_at=self.last_sync_at,
            error_kind=error.kind if error is not None else None,
            error=str(error) if error is not None else None,
            error_at=self.last_error_at,
            mode=None if self.client is None else "idle" if self.idling else "polling",
            account=self.config.account,
        )

    def close(self) -> None:
        if self.connecting is not None:
            self.connecting.abandon(log_out=self.shared is None)  # the shared one is the others' too
            self.connecting = None
        if self.shared is not None:
            self.client = None  # the connection is the other polled folders' too
            return
        if self.client is not None:
            if self.idling:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    self.client.idle_done()
            logout_quietly(self.client)
        self.client = None
        self.idling = False
        self.done_sent_at = None

    # -- internals ---------------------------------------------------------------------------

    def _connect(self) -> bool:
        try:
            if self.connect_in_background:
                self.client = self._connected_in_background()
                if self.client is None:
                    return False
            else:
                self.client = self._open()
        except ImapError as exc:
            self._schedule_reconnect(exc)
            return False
        if self.failures:
            metrics.imap_reconnected()
        return True

    def _open(self) -> IMAPClient:
        return self.shared.open() if self.shared is not None else self.connector(self.server)

    def _connected_in_background(self) -> IMAPClient | None:
        """Start an attempt, or take the result of the one started: None while it connects."""
        if self.connecting is None:
            self.connecting = ConnectAttempt(self._open)
        if not self.connecting.done:
            return None
        attempt, self.connecting = self.connecting, None
        return attempt.result()

    def _schedule_reconnect(self, error: ImapError) -> None:
        self.failures += 1
        self.last_error = error
        self.last_error_at = self.wall_clock()
        metrics.imap_error(error.kind, self.config.account)
        oauth2 = self.server.tokens is not None
        # A missing folder, or no free connection slot of the account (nothing was sent to the
        # server), says nothing about the account's sign-in or server: the watcher's own policy.
        if self.gate is not None and not isinstance(
            error, ImapFolderMissingError | ImapNoConnectionSlotError
        ):
            # The account's next attempt, looked at again every RECHECK_SECONDS (a new login).
            delay = self.gate.failed(error.kind, str(error))
            self.next_connect_at = self.monotonic() + min(delay, RECHECK_SECONDS)
        else:
            delay = self.policy.delay(error, self.failures)
            if oauth2 and isinstance(error, ImapAuthError):
                delay = min(delay, OAUTH2_AUTH_RETRY_MAX_SECONDS)
            self.next_connect_at = self.monotonic() + delay
        fields = {
            "error": str(error),
            "error_type": type(error).__name__,
            "retry_in_seconds": round(delay, 1),
        }
        if oauth2 and isinstance(error, ImapAuthError):
            self.log.error("IMAP sign-in with OAuth2 refused; the error says what to do", **fields)
        elif isinstance(error, ImapAuthError | ImapSecurityError):
            self.log.error(
                "IMAP login refused; check EMAIL_USERNAME / EMAIL_PASSWORD / TLS settings", **fields
            )
        elif isinstance(error, ImapFolderMissingError):
            self.log.error("folder does not exist on the server; check EMAIL_FOLDERS", **fields)
        else:
            self.log.warning("IMAP connection failed", failures=self.failures, **fields)

    def _drop(self, error: ImapError) -> None:
        if self.shared is not None and self.client is not None:
            self.shared.drop(self.client)
        elif self.client is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                self.client.shutdown()
        self.client = None
        self.idling = False
        self.done_sent_at = None
        self._schedule_reconnect(error)

    def _use_idle(self) -> bool:
        return (
            self.config.use_idle
            and self.shared is None
            and self.client is not None
            and self.client.has_capability("IDLE")
        )

    def _sync(self, *, reconcile: bool) -> SyncReport | None:
        assert self.client is not None
        try:
            if self.idling:
                # The pass follows IDLE's answer (``_done_step``), which is not waited for here.
                send_idle_done(self.client)
                self.idling = False
                self.done_sent_at = self.monotonic()
                self.reconcile_after_done = reconcile
                return None
            will_idle = self._use_idle()
            report = self.sync.sync(
                self.client,
                reconcile=reconcile,
                budget_seconds=self.pass_budget_seconds,
                keep_selected=will_idle,
            )
            # Mail that arrived during the pass was announced to a command of the pass: sync again
            # rather than IDLE on it.
            missed = will_idle and forget_unsolicited(self.client)
        except CONNECTION_ERRORS as exc:
            self._drop(ImapTransientError(f"{type(exc).__name__}: {exc}"))
            return None
        except ImapFolderMissingError as exc:
            self.close()  # the connection is fine, but holds nothing to watch until the folder exists
            self._schedule_reconnect(exc)
            return None
        # The failure count is reset by a pass, not by a login: a failure that follows every login
        # (a folder that cannot be selected) must keep backing off, not reconnect every second.
        if self.failures:
            self.log.info("reconnected", after_failures=self.failures)
        self.failures = 0
        self.last_sync_at = self.wall_clock()
        metrics.folder_synced(self.folder, self.last_sync_at)
        if self.gate is not None:
            self.gate.synced()
        now = self.monotonic()
        self.catching_up = not report.complete or missed
        self.next_poll_at = now + self.config.poll_interval_seconds
        if reconcile:
            self.next_reconcile_at = now + self.config.reconcile_interval_seconds
        if not self.catching_up and self._use_idle():
            self.client.idle()
            self.idling = True
            self.idle_started_at = now
            # An announcement that came with the server's "+ idling" is set aside, or read ahead.
            # A close of the connection is found by the next step.
            self.catching_up = (
                forget_unsolicited(self.client) or pending_input(self.client) is not PendingInput.NOTHING
            )
        return report

    def _done_step(self, now: float) -> SyncReport | None:
        """IDLE's answer to DONE, once it came: then the pass. A server that gives none within
        the timeout is taken for gone (the connection is dropped and opened again later)."""
        assert self.client is not None and self.done_sent_at is not None
        pending = pending_input(self.client)
        if pending is PendingInput.NOTHING:
            if now - self.done_sent_at >= self.server.timeout_seconds:
                waited = round(now - self.done_sent_at, 1)
                self._drop(ImapTransientError(f"the server did not answer DONE within {waited} s"))
            return None
        if pending is PendingInput.CLOSED:
            self._drop(ImapTransientError("the server closed the connection without BYE"))
            return None
        finish_idle_done(self.client)
        self.done_sent_at = None
        return self._sync(reconcile=self.reconcile_after_done)

    def _idle_step(self, max_wait: float) -> SyncReport | None:
        assert self.client is not None
        pending = pending_input(self.client)
        if pending is PendingInput.DATA:
            # idle_check() waits on the socket only; lines already read ahead would wait there.
            return self._sync(reconcile=self.monotonic() >= self.next_reconcile_at)
        if pending is PendingInput.CLOSED:
            self._drop(ImapTransientError("the server closed the connection without BYE"))
            return None
        responses = self.client.idle_check(timeout=max_wait)
        if not responses and pending_input(self.client) is PendingInput.CLOSED:
            # idle_check() returns [] at end of file, and a closed socket is always readable: waiting
            # on it again would spin until the next poll.
            self._drop(ImapTransientError("the server closed the connection without BYE"))
            return None
        if any(_is_bye(response) for response in responses):
            # The server is going away (restart, shutdown): reconnect rather than wait on a dead socket.
            self._drop(ImapTransientError(f"server said BYE: {responses}"))
            return None
        now = self.monotonic()
        changed = any(_is_change(response) for response in responses)
        # RFC 2177: re-issue IDLE well before the server's 29-minute timeout; and a cheap poll behind
        # IDLE catches anything a server failed to push.
        renew = now - self.idle_started_at >= self.config.idle_renew_seconds
        poll_due = now >= self.next_poll_at
        if changed or renew or poll_due:
            return self._sync(reconcile=now >= self.next_reconcile_at)
        return None


def _is_bye(response: object) -> bool:
    return isinstance(response, tuple) and bool(response) and response[0] == b"BYE"


def _is_change(response: object) -> bool:
    """EXISTS, EXPUNGE, FETCH (flags), VANISHED: anything but keep-alive chatter ("OK Still here")."""
    if not isinstance(response, tuple) or len(response) < 2:
        return False
    kind = response[1]
    return isinstance(kind, bytes) and kind.upper() in (
        b"EXISTS",
        b"EXPUNGE",
        b"FETCH",
        b"RECENT",
        b"VANISHED",
    )
