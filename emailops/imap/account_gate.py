"""What a worker's folder watchers ask before they sign in to an account, and tell after.

All watchers of an account, in every worker and container, go through its row in ``account_state``:
one refused sign-in makes all of them wait for the account's next attempt (no storm of logins with
a wrong password), and one successful sync brings the account back to ``ok`` for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from sqlalchemy import Engine

from emailops import metrics
from emailops.store import account_state
from emailops.store.account_state import AccountState, Event, State

log = structlog.get_logger(component="imap")

# A watcher waiting for its account's next attempt looks at the row again this often, so that a
# new `auth login` (which sets the next attempt to now) is taken up within these seconds.
RECHECK_SECONDS = 15.0
# While the account is ok, a successful sync is written at most this often (last_synced_at).
SYNCED_WRITE_SECONDS = 30.0


class AccountGate:
    """The account's row, as its watchers use it. ``mask`` removes secrets from an error's text
    before it is stored (the operational shell's redactor)."""

    def __init__(
        self,
        engine: Engine,
        account: str,
        *,
        mask: Callable[[str], str] = lambda text: text,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.account = account
        self.mask = mask
        self.monotonic = monotonic
        self._state: State | None = None
        self._synced_written_at: float | None = None

    def for_account(self, account: str) -> AccountGate:
        """This gate itself for its own account; for another, a gate of that account's row."""
        if account == self.account:
            return self
        return AccountGate(self.engine, account, mask=self.mask, monotonic=self.monotonic)

    def wait_seconds(self) -> float:
        """0 when a sign-in may be tried now; otherwise how long to wait before asking again."""
        with self.engine.connect() as conn:
            seconds = account_state.seconds_until_due(conn, self.account)
        return RECHECK_SECONDS if seconds is None else min(seconds, RECHECK_SECONDS)

    def failed(self, error_kind: str, error: str) -> float:
        """Record a failed sign-in or a lost connection; the seconds until the account's next attempt."""
        with self.engine.begin() as conn:
            after = account_state.record(
                conn,
                self.account,
                account_state.event_of(error_kind),
                error_kind=error_kind,
                error=self.mask(error),
            )
            seconds = account_state.seconds_until_due(conn, self.account)
        self._changed(after)
        return RECHECK_SECONDS if seconds is None else seconds

    def synced(self) -> None:
        """Record a successful sync (written at once after a failure, else every SYNCED_WRITE_SECONDS)."""
        now = self.monotonic()
        written = self._synced_written_at
        if self._state is State.OK and written is not None and now - written < SYNCED_WRITE_SECONDS:
            return
        with self.engine.begin() as conn:
            after = account_state.record(conn, self.account, Event.SYNCED)
        self._synced_written_at = now
        self._changed(after)

    def credentials_changed(self) -> None:
        """Try the account at once (a worker's start: the password may have changed meanwhile)."""
        with self.engine.begin() as conn:
            after = account_state.record(conn, self.account, Event.CREDENTIALS_CHANGED)
        self._changed(after)

    def _changed(self, after: AccountState) -> None:
        if after.state is not self._state and self._state is not None:
            log.info(
                "account state changed",
                account=self.account,
                state=after.state.value,
                previous=self._state.value,
                next_attempt_at=None if after.next_attempt_at is None else after.next_attempt_at.isoformat(),
            )
        self._state = after.state
        metrics.account_state(self.account, after.state.value, [state.value for state in State])
        if after.last_synced_at is not None:
            metrics.account_synced(self.account, after.last_synced_at.timestamp())
