"""Each mail account's state, seen at once by every worker, container and the healthcheck.

States and their transitions are data (after supervisord's process states)::

    ok, backoff  --synced-------------------> ok
    ok, backoff  --failed (network)---------> backoff      next try: 1 s doubling, at most 15 min
    any but disabled --refused (sign-in)----> auth_failed  next try: in 15 to 30 min
    auth_failed  --failed (network)---------> auth_failed  (the credentials are still unproven)
    auth_failed  --synced-------------------> ok
    any but disabled --credentials_changed--> (same)       next try: at once
    any but disabled --new_grant------------> ok           next try: at once
    any          --disable------------------> disabled     never tried
    disabled     --enable-------------------> ok           at once

Failures reported while the account waits for its next attempt (its other watchers losing their
connections to the same outage) update the error but neither count nor move the next attempt.
An event the table does not list for the current state changes nothing (a worker's late report on
an account the operator disabled meanwhile). A refusal is only what the server said about the
credentials (IMAP ``NO [AUTHENTICATIONFAILED]``, a refused LOGIN, OAuth2 ``invalid_grant``):
``ImapError.kind == "auth"``. A timeout, a dropped connection or a server that stops answering is
``failed``, never a refusal.

The row (``schema.account_state``) is keyed by the account's name; its times come from the
database's clock (``db_clock``), so every host reads the same next attempt. The pure part
(``advance``) takes the time as an argument, for tests.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, select, update
from tenacity import wait_exponential_jitter, wait_random

from emailops.backoff import delay_seconds
from emailops.store.db_clock import db_now
from emailops.store.dialect import insert_unless_present, locking
from emailops.store.schema import account_state


class State(enum.StrEnum):
    OK = "ok"
    BACKOFF = "backoff"
    AUTH_FAILED = "auth_failed"
    DISABLED = "disabled"


class Event(enum.StrEnum):
    SYNCED = "synced"  # signed in and synced a folder
    FAILED = "failed"  # network trouble, a timeout, a server not answering, TLS, a connection limit
    REFUSED = "refused"  # the server refused the credentials
    CREDENTIALS_CHANGED = "credentials_changed"  # a worker's start: the password may have changed
    # A new OAuth2 grant from the authorization server (`auth login`, the console's Reconnect):
    # the refusal was of the old grant, so the account is no longer refused (until it is again).
    NEW_GRANT = "new_grant"
    DISABLE = "disable"
    ENABLE = "enable"


_WORKING = (State.OK, State.BACKOFF, State.AUTH_FAILED)

TRANSITIONS: Mapping[tuple[State, Event], State] = {
    **{(state, Event.SYNCED): State.OK for state in _WORKING},
    (State.OK, Event.FAILED): State.BACKOFF,
    (State.BACKOFF, Event.FAILED): State.BACKOFF,
    (State.AUTH_FAILED, Event.FAILED): State.AUTH_FAILED,
    **{(state, Event.REFUSED): State.AUTH_FAILED for state in _WORKING},
    **{(state, Event.CREDENTIALS_CHANGED): state for state in _WORKING},
    **{(state, Event.NEW_GRANT): State.OK for state in _WORKING},
    **{(state, Event.DISABLE): State.DISABLED for state in (*_WORKING, State.DISABLED)},
    (State.DISABLED, Event.ENABLE): State.OK,
}

# Transient failures: 1 s doubling, at most 15 minutes, then every 15 minutes for ever.
BACKOFF_WAIT = wait_exponential_jitter(initial=1, max=900, jitter=1)
# Refused credentials: slowly, never a storm that gets the account locked by the provider.
AUTH_FAILED_WAIT = wait_random(min=900, max=1800)

# ImapError.kind of a refusal of the credentials (emailops.imap.errors.ImapAuthError).
REFUSED_KIND = "auth"


def event_of(error_kind: str) -> Event:
    """What a failure of ``ImapError.kind`` ``error_kind`` means for its account."""
    return Event.REFUSED if error_kind == REFUSED_KIND else Event.FAILED


@dataclass(frozen=True)
class AccountState:
    account: str
    state: State
    failures: int = 0
    last_error_kind: str | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_synced_at: datetime | None = None
    next_attempt_at: datetime | None = None  # None: at once (or never, when disabled)
    updated_at: datetime | None = None

    def due(self, now: datetime) -> bool:
        """Whether a sign-in may be tried at ``now``."""
        if self.state is State.DISABLED:
            return False
        return self.next_attempt_at is None or now >= self.next_attempt_at


def retry_delay(state: State, failures: int) -> timedelta | None:
    """How long after the ``failures``-th failure in a row the account is tried again (None: at once)."""
    if state is State.BACKOFF:
        return timedelta(seconds=delay_seconds(BACKOFF_WAIT, failures))
    if state is State.AUTH_FAILED:
        return timedelta(seconds=delay_seconds(AUTH_FAILED_WAIT, failures))
    return None


def advance(
    current: AccountState,
    event: Event,
    now: datetime,
    *,
    error_kind: str | None = None,
    error: str | None = None,
) -> AccountState | None:
    """The state after ``event`` at ``now``, or None when the table allows no such transition."""
    target = TRANSITIONS.get((current.state, event))
    if target is None:
        return None
    if event is Event.SYNCED:
        return replace(
            current, state=target, failures=0, last_synced_at=now, next_attempt_at=None, updated_at=now
        )
    if event in (Event.FAILED, Event.REFUSED):
        if target is current.state and current.next_attempt_at is not None and now < current.next_attempt_at:
            # Another watcher's report of the same outage, before the next attempt: not a new try.
            return replace(
                current, last_error_kind=error_kind, last_error=error, last_error_at=now, updated_at=now
            )
        failures = current.failures + 1
        delay = retry_delay(target, failures)
        return replace(
            current,
            state=target,
            failures=failures,
            last_error_kind=error_kind,
            last_error=error,
            last_error_at=now,
            next_attempt_at=None if delay is None else now + delay,
            updated_at=now,
        )
    if event in (Event.ENABLE, Event.NEW_GRANT):
        return replace(current, state=target, failures=0, next_attempt_at=None, updated_at=now)
    # CREDENTIALS_CHANGED and DISABLE: the next attempt at once, or never.
    return replace(current, state=target, next_attempt_at=None, updated_at=now)


# -- in the database ---------------------------------------------------------------------------


def _from_row(row: Any) -> AccountState:
    return AccountState(
        account=row.account,
        state=State(row.state),
        failures=row.failures,
        last_error_kind=row.last_error_kind,
        last_error=row.last_error,
        last_error_at=row.last_error_at,
        last_synced_at=row.last_synced_at,
        next_attempt_at=row.next_attempt_at,
        updated_at=row.updated_at,
    )


def database_now(conn: Connection) -> datetime:
    """The database's clock now, as an aware UTC datetime (SQLite's comes back naive)."""
    moment: datetime = conn.execute(select(db_now(conn))).scalar_one()
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read_state(conn: Connection, account: str) -> AccountState | None:
    row = conn.execute(select(account_state).where(account_state.c.account == account)).one_or_none()
    return None if row is None else _from_row(row)


def account_states(engine: Engine) -> dict[str, AccountState]:
    """Every account's state by name (those never reported have none): what `accounts list`, the
    healthcheck's view and the console show."""
    with engine.connect() as conn:
        rows = conn.execute(select(account_state).order_by(account_state.c.account)).all()
    return {row.account: _from_row(row) for row in rows}


def record(
    conn: Connection,
    account: str,
    event: Event,
    *,
    error_kind: str | None = None,
    error: str | None = None,
) -> AccountState:
    """Apply ``event`` to the account's row (made at its first event) in the caller's transaction,
    locked until it ends; returns the state after it (unchanged when the event is not allowed)."""
    now = database_now(conn)
    conn.execute(
        insert_unless_present(conn, account_state, ["account"]).values(
            account=account, state=State.OK.value, failures=0, updated_at=now
        )
    )
    row = conn.execute(locking(conn, select(account_state).where(account_state.c.account == account))).one()
    current = _from_row(row)
    after = advance(current, event, now, error_kind=error_kind, error=error)
    if after is None:
        return current
    conn.execute(
        update(account_state)
        .where(account_state.c.account == account)
        .values(
            state=after.state.value,
            failures=after.failures,
            last_error_kind=after.last_error_kind,
            last_error=after.last_error,
            last_error_at=after.last_error_at,
            last_synced_at=after.last_synced_at,
            next_attempt_at=after.next_attempt_at,
            updated_at=after.updated_at,
        )
    )
    return after


def seconds_until_due(conn: Connection, account: str) -> float | None:
    """Seconds before the account may be tried (0: now), by the database's clock; None when it is
    disabled."""
    current = read_state(conn, account)
    if current is None:
        return 0.0
    if current.state is State.DISABLED:
        return None
    if current.next_attempt_at is None:
        return 0.0
    return max(0.0, (current.next_attempt_at - database_now(conn)).total_seconds())
