"""Each account's state: the transitions (pure, with the time given), the row on both index
backends, and the watchers against a real Dovecot (a wrong password, then the right one) and
against servers that accept connections and say nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from imapclient import IMAPClient
from sqlalchemy import text

from emailops import metrics
from emailops.config import ServerConfig, TlsSecurity
from emailops.imap.account_gate import RECHECK_SECONDS, AccountGate
from emailops.imap.connection import connect
from emailops.imap.errors import ImapAuthError, ImapTransientError, classify_login_failure
from emailops.imap.sync import FolderSync
from emailops.imap.watcher import FolderWatcher
from emailops.store import account_state
from emailops.store.account_state import TRANSITIONS, AccountState, Event, State, advance, event_of
from emailops.store.migrations import migrate
from localmail.dovecot import LocalDovecot
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, message, rows, sync_config
from tests.silent_server import silent_server

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fresh(state: State = State.OK) -> AccountState:
    return AccountState(account="work", state=state)


def seconds(delta: timedelta | None) -> float:
    assert delta is not None
    return delta.total_seconds()


# -- transitions -------------------------------------------------------------------------------


def test_network_failures_back_off_doubling_to_15_minutes_then_for_ever() -> None:
    current, now = fresh(), T0
    delays = []
    for _ in range(16):
        after = advance(current, Event.FAILED, now, error_kind="connection", error="timed out")
        assert after is not None and after.state is State.BACKOFF
        assert after.next_attempt_at is not None
        delays.append(seconds(after.next_attempt_at - now))
        current, now = after, after.next_attempt_at  # tried again when due, and failed again
    for failures, delay in enumerate(delays, start=1):
        floor = min(2.0 ** (failures - 1), 900.0)
        assert floor <= delay <= floor + 1, (failures, delays)
    assert current.failures == 16 and current.last_error == "timed out"


def test_reports_of_one_outage_before_the_next_attempt_count_once() -> None:
    first = advance(fresh(), Event.FAILED, T0, error_kind="connection", error="reset")
    assert first is not None and first.next_attempt_at is not None
    # Another watcher of the account loses its connection to the same outage a moment later.
    second = advance(
        first, Event.FAILED, T0 + timedelta(milliseconds=100), error_kind="connection", error="EOF"
    )
    assert second is not None
    assert second.failures == 1 and second.next_attempt_at == first.next_attempt_at
    assert second.last_error == "EOF"


def test_a_refusal_waits_15_to_30_minutes_and_a_network_failure_meanwhile_keeps_it() -> None:
    backoff = advance(fresh(), Event.FAILED, T0, error_kind="connection", error="timed out")
    assert backoff is not None
    later = T0 + timedelta(minutes=1)
    refused = advance(backoff, Event.REFUSED, later, error_kind="auth", error="[AUTHENTICATIONFAILED]")
    assert refused is not None and refused.state is State.AUTH_FAILED
    assert 900 <= seconds(refused.next_attempt_at - later if refused.next_attempt_at else None) <= 1800
    # Tried again after its wait: the server does not answer this time. Still auth_failed (the
    # credentials are unproven), still slow.
    assert refused.next_attempt_at is not None
    retry_at = refused.next_attempt_at
    timed_out = advance(refused, Event.FAILED, retry_at, error_kind="connection", error="timed out")
    assert timed_out is not None and timed_out.state is State.AUTH_FAILED
    assert 900 <= seconds(timed_out.next_attempt_at - retry_at if timed_out.next_attempt_at else None) <= 1800


def test_a_sync_makes_every_working_state_ok() -> None:
    for state in (State.OK, State.BACKOFF, State.AUTH_FAILED):
        failing = AccountState(
            account="work", state=state, failures=7, next_attempt_at=T0 + timedelta(hours=1)
        )
        after = advance(failing, Event.SYNCED, T0)
        assert after is not None
        assert (after.state, after.failures, after.last_synced_at, after.next_attempt_at) == (
            State.OK,
            0,
            T0,
            None,
        )


def test_changed_credentials_are_tried_at_once_in_the_same_state() -> None:
    refused = advance(fresh(), Event.REFUSED, T0, error_kind="auth", error="refused")
    assert refused is not None and not refused.due(T0 + timedelta(minutes=1))
    changed = advance(refused, Event.CREDENTIALS_CHANGED, T0 + timedelta(minutes=1))
    assert changed is not None and changed.state is State.AUTH_FAILED
    assert changed.due(T0 + timedelta(minutes=1)) and changed.last_error == "refused"


def test_a_new_grant_ends_a_refusal_and_is_tried_at_once() -> None:
    refused = advance(fresh(), Event.REFUSED, T0, error_kind="auth", error="refused")
    assert refused is not None and refused.state is State.AUTH_FAILED
    granted = advance(refused, Event.NEW_GRANT, T0 + timedelta(minutes=1))
    assert granted is not None and granted.state is State.OK and granted.failures == 0
    assert granted.due(T0 + timedelta(minutes=1))
    assert advance(fresh(State.DISABLED), Event.NEW_GRANT, T0) is None


def test_a_disabled_account_is_never_due_and_ignores_the_workers_reports() -> None:
    disabled = advance(fresh(State.BACKOFF), Event.DISABLE, T0)
    assert disabled is not None and disabled.state is State.DISABLED
    assert not disabled.due(T0 + timedelta(days=1))
    for event in (Event.SYNCED, Event.FAILED, Event.REFUSED, Event.CREDENTIALS_CHANGED):
        assert advance(disabled, event, T0) is None
    enabled = advance(disabled, Event.ENABLE, T0)
    assert enabled is not None and enabled.state is State.OK and enabled.due(T0)


def test_the_table_allows_enable_only_from_disabled() -> None:
    assert [state for (state, event) in TRANSITIONS if event is Event.ENABLE] == [State.DISABLED]
    assert advance(fresh(), Event.ENABLE, T0) is None


def test_only_a_refusal_of_the_credentials_is_auth_failed() -> None:
    assert event_of("auth") is Event.REFUSED
    for kind in ("connection", "too_many_connections", "tls"):
        assert event_of(kind) is Event.FAILED
    # What servers say: a refusal, and an authentication backend that is down (RFC 5530).
    assert isinstance(classify_login_failure("[AUTHENTICATIONFAILED] Authentication failed."), ImapAuthError)
    unavailable = classify_login_failure("[UNAVAILABLE] Temporary authentication failure. [host:2024]")
    assert type(unavailable) is ImapTransientError


def test_an_account_named_by_an_address_is_labelled_by_a_stable_short_id() -> None:
    label = metrics.account_label("alice@example.com")
    assert "@" not in label and "alice" not in label and label.startswith("acct-") and len(label) == 17
    assert metrics.account_label("alice@example.com") == label != metrics.account_label("bob@example.com")
    assert metrics.account_label("support") == "support"


# -- in the database ---------------------------------------------------------------------------


def test_the_row_is_kept_by_the_database_clock_on_both_backends(db_url: str) -> None:
    engine = index_engine(db_url)
    try:
        with engine.begin() as conn:
            account_state.record(conn, "work", Event.FAILED, error_kind="connection", error="timed out")
            db_time = account_state.database_now(conn)
        with engine.begin() as conn:
            account_state.record(conn, "home", Event.SYNCED)
            wait = account_state.seconds_until_due(conn, "work")
            assert account_state.seconds_until_due(conn, "home") == 0.0
            assert account_state.seconds_until_due(conn, "never-seen") == 0.0
        states = account_state.account_states(engine)
        assert sorted(states) == ["home", "work"]
        work = states["work"]
        assert (work.state, work.failures, work.last_error_kind) == (State.BACKOFF, 1, "connection")
        assert work.last_error_at is not None and abs(seconds(work.last_error_at - db_time)) < 1
        assert wait is not None and 0 < wait <= 2
        assert states["home"].state is State.OK and states["home"].last_synced_at is not None
        with engine.begin() as conn:
            account_state.record(conn, "work", Event.DISABLE)
            assert account_state.seconds_until_due(conn, "work") is None
            # A worker's late report does not undo the operator's change.
            assert account_state.record(conn, "work", Event.SYNCED).state is State.DISABLED
    finally:
        engine.dispose()


def test_a_database_migrated_past_16_without_it_gets_the_table(db_url: str) -> None:
    """Versions are given out to changes made side by side: a database that ran 17 before 16
    existed gets 16 at its next start."""
    engine = index_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE account_state"))
            conn.execute(text("DELETE FROM schema_migrations WHERE version = 16"))
        assert [migration.version for migration in migrate(engine)] == [16]
        with engine.begin() as conn:
            account_state.record(conn, "work", Event.SYNCED)
        assert account_state.account_states(engine)["work"].state is State.OK
    finally:
        engine.dispose()


# -- the watchers against real servers -----------------------------------------------------------


def _counting(calls: list[str]) -> Callable[[ServerConfig], IMAPClient]:
    def counted(config: ServerConfig) -> IMAPClient:
        calls.append(config.host)
        return connect(config)

    return counted


def _state(engine: object, account: str = ACCOUNT) -> AccountState:
    return account_state.account_states(engine)[account]  # type: ignore[arg-type]


def test_a_wrong_password_is_auth_failed_for_every_watcher_and_the_right_one_makes_it_ok(
    dovecot: LocalDovecot, db_url: str
) -> None:
    engine = index_engine(db_url)
    wrong = "not-alices-password"
    try:
        dovecot.deliver(ALICE, message(1))
        config = sync_config()
        calls: list[str] = []
        gate = AccountGate(engine, ACCOUNT)
        clock = [0.0]

        def watcher(server: ServerConfig) -> FolderWatcher:
            return FolderWatcher(
                server,
                config,
                FolderSync(engine, config, "INBOX"),
                connector=_counting(calls),
                gate=gate,
                monotonic=lambda: clock[0],
                sleep=lambda _seconds: None,
            )

        first, second = (
            watcher(imap_config(dovecot, password=wrong)),
            watcher(imap_config(dovecot, password=wrong)),
        )
        first.step(0.0)
        refused = _state(engine)
        assert refused.state is State.AUTH_FAILED and refused.last_error_kind == "auth"
        assert "AUTHENTICATIONFAILED" in (refused.last_error or "") and wrong not in (
            refused.last_error or ""
        )
        assert refused.next_attempt_at is not None and refused.last_error_at is not None
        assert 900 <= seconds(refused.next_attempt_at - refused.last_error_at) <= 1800
        assert calls == [dovecot.host]
        # The account's other watchers, and this one when it looks again, do not sign in meanwhile.
        for _ in range(3):
            clock[0] += RECHECK_SECONDS + 1
            first.step(0.0)
            second.step(0.0)
        assert calls == [dovecot.host] and _state(engine).failures == 1
        # The password is changed and the worker starts again: tried at once, and it syncs.
        gate.credentials_changed()
        fixed = watcher(imap_config(dovecot))
        fixed.step(0.0)
        assert len(calls) == 2
        ok = _state(engine)
        assert (ok.state, ok.failures, ok.next_attempt_at) == (State.OK, 0, None)
        assert ok.last_synced_at is not None and ok.last_error_kind == "auth"  # kept, for the operator
        assert rows(engine, "SELECT count(*) FROM messages") == [(1,)]
        fixed.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "greeting",
    [b"", b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"],
    ids=["says-nothing", "greets-then-says-nothing"],
)
def test_a_server_that_says_nothing_is_backoff_with_growing_delays_never_auth_failed(
    db_url: str, greeting: bytes
) -> None:
    engine = index_engine(db_url)
    try:
        with silent_server(greeting) as port:
            config = sync_config()
            server = ServerConfig(
                host="127.0.0.1",
                port=port,
                username=ALICE,
                password="pw",
                security=TlsSecurity.NONE,
                timeout_seconds=0.5,
            )
            watcher = FolderWatcher(
                server, config, FolderSync(engine, config, "INBOX"), gate=AccountGate(engine, ACCOUNT)
            )
            waits = []
            deadline = time.monotonic() + 60
            while len(waits) < 3:
                assert time.monotonic() < deadline, waits
                before = _state(engine).failures if account_state.account_states(engine) else 0
                watcher.step(0.2)
                after = _state(engine)
                assert after.state is State.BACKOFF, after
                if after.failures > before:
                    assert after.next_attempt_at is not None and after.last_error_at is not None
                    waits.append(seconds(after.next_attempt_at - after.last_error_at))
        assert after.last_error_kind == "connection"
        assert 1 <= waits[0] <= 2 and 2 <= waits[1] <= 3 and 4 <= waits[2] <= 5, waits
    finally:
        engine.dispose()
