"""The IMAP connections one worker opens for one account, within the account's budget and the
host's login rate.

Before a connection is opened it takes one of the account's slots (``store.connection_slots``:
IMAP_MAX_CONNECTIONS across all workers and containers); then its login waits for the host's
next free moment (``store.login_pacing``: IMAP_LOGINS_PER_SECOND across all of them). The first
login of the account in this process also waits a random part of ``startup_jitter_seconds``, so
that accounts started together do not all come in the first second. ``connect`` is a connector
as ``connection.connect`` is, and may run on a thread of its own (``background_connect``): the
waits hold up nothing else. A slot is given back a moment after its connection closed
(``release_closed``), and held meanwhile by the worker's lease rounds (``lease_round``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

import structlog
from imapclient import IMAPClient
from sqlalchemy import Engine

from emailops.config import ServerConfig, SignInLimits
from emailops.imap.connection import connect
from emailops.imap.errors import ImapNoConnectionSlotError
from emailops.store import connection_slots, login_pacing

log = structlog.get_logger(component="imap")

# A slot is given back this long after its connection closed: the server counts a session until
# its process has ended, a little after the logout's answer (seen with Dovecot's ``doveadm who``).
RELEASE_DELAY_SECONDS = 1.0


class AccountConnections:
    def __init__(
        self,
        engine: Engine,
        account: str,
        *,
        holder: str,
        max_connections: int,
        limits: SignInLimits,
        ttl: timedelta,
        connector: Callable[[ServerConfig], IMAPClient] = connect,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.account = account
        self.holder = holder
        self.max_connections = max_connections
        self.limits = limits
        self.ttl = ttl
        self.connector = connector
        self.sleep = sleep
        self.monotonic = monotonic
        self._lock = threading.Lock()
        # Slot number -> its connection (None while it is being opened).
        self._slots: dict[int, IMAPClient | None] = {}
        self._first_login = True
        # Slot number -> when its connection was first seen closed (``monotonic``).
        self._closed_at: dict[int, float] = {}
        self.log = log.bind(account=account)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._slots)

    def connect(self, server: ServerConfig) -> IMAPClient:
        """A logged-in client holding one of the account's slots; ``ImapNoConnectionSlotError``
        when all are held, or what ``connector`` raises."""
        with self.engine.begin() as conn:
            slot = connection_slots.acquire_slot(
                conn, self.account, self.holder, self.max_connections, self.ttl
            )
        if slot is None:
            raise ImapNoConnectionSlotError(
                f"all {self.max_connections} IMAP connections of {self.account} are in use "
                "(IMAP_MAX_CONNECTIONS, counted over every worker)"
            )
        with self._lock:
            self._slots[slot] = None
        try:
            self._wait_for_turn(server.host)
            client = self.connector(server)
        except BaseException:
            self._release([slot])
            raise
        with self._lock:
            self._slots[slot] = client
        return client

    def release_closed(self, open_clients: Iterable[IMAPClient | None]) -> None:
        """Give back the slots whose connection is not among ``open_clients`` (it was logged out or
        dropped) since ``RELEASE_DELAY_SECONDS``. A connection still being opened keeps its slot."""
        open_ids = {id(client) for client in open_clients if client is not None}
        now = self.monotonic()
        with self._lock:
            opened = {slot: client for slot, client in self._slots.items() if client is not None}
            closed = {slot for slot, client in opened.items() if id(client) not in open_ids}
        for slot in closed - set(self._closed_at):
            self._closed_at[slot] = now
        due = [slot for slot in closed if now - self._closed_at[slot] >= RELEASE_DELAY_SECONDS]
        if due:
            self._release(due)

    def check_held(self, still_held: set[int]) -> None:
        """The slots the worker's lease round renewed (``still_held``): a slot held here and not
        among them expired while held and may be another's now."""
        with self._lock:
            lost = set(self._slots) - still_held
        if lost:
            # Paused past the slots' expiry. Nothing closes the connections here; they are given
            # back when their watchers drop them.
            self.log.warning("IMAP connection slots expired while held", slots=sorted(lost))

    def close(self) -> None:
        """Give back every slot (the connections are closed by their users)."""
        with self._lock:
            held = list(self._slots)
        self._release(held)

    def _release(self, slots: list[int]) -> None:
        with self.engine.begin() as conn:
            for slot in slots:
                connection_slots.release_slot(conn, self.account, self.holder, slot)
        with self._lock:
            for slot in slots:
                self._slots.pop(slot, None)
                self._closed_at.pop(slot, None)

    def _wait_for_turn(self, host: str) -> None:
        with self._lock:
            first, self._first_login = self._first_login, False
        if first and self.limits.startup_jitter_seconds > 0:
            self.sleep(random.uniform(0, self.limits.startup_jitter_seconds))  # nosec B311
        if self.limits.logins_per_second <= 0:
            return
        interval = timedelta(seconds=1 / self.limits.logins_per_second)
        with self.engine.begin() as conn:
            wait = login_pacing.reserve_login(conn, host, interval)
        if wait > timedelta(0):
            self.sleep(wait.total_seconds())
