"""Fairness between mailboxes, against Dovecot: an account's connection budget holds over several
workers, logins to one host are paced across workers (the first after a random wait), and neither
a large backfill nor a server that says nothing delays another mailbox's new mail in a worker
serving both."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from emailops.config import SignInLimits
from emailops.imap.connection_budget import AccountConnections
from emailops.imap.errors import ImapNoConnectionSlotError
from emailops.pipeline import MailPipeline
from emailops.store import connection_slots
from emailops.store.schema import imap_connection_slots
from localmail.dovecot import LocalDovecot
from tests.index_helpers import imap_config, index_engine, indexed_at, message, rows, sync_config

pytestmark = pytest.mark.timeout(300)

ANNA = "anna@example.test"
BORIS = "boris@example.test"


def _count(engine: Engine, sql: str) -> int:
    return int(rows(engine, sql)[0][0])  # type: ignore[call-overload]


def _run_until(pipelines: list[MailPipeline], done: Callable[[], bool], seconds: float) -> float:
    """Step the pipelines in turn until ``done``; the seconds it took (fails after ``seconds``)."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < seconds, "not done in time"
        for pipeline in pipelines:
            pipeline.run_once()
    return time.monotonic() - started


def test_slots_are_taken_up_to_the_budget_and_expire_with_their_holder(db_url: str) -> None:
    engine = index_engine(db_url)
    ttl = timedelta(seconds=30)
    with engine.begin() as conn:
        taken = [connection_slots.acquire_slot(conn, "acct", "w1", 2, ttl) for _ in range(3)]
        assert taken == [0, 1, None]
        assert connection_slots.acquire_slot(conn, "acct", "w2", 2, ttl) is None
        assert connection_slots.acquire_slot(conn, "other", "w2", 2, ttl) == 0  # a budget per account
        connection_slots.release_slot(conn, "acct", "w2", 0)  # not the holder: nothing happens
        assert connection_slots.slots_held(conn, ["acct", "other", "none"]) == {"acct": 2, "other": 1}
        connection_slots.release_slot(conn, "acct", "w1", 1)
        assert connection_slots.acquire_slot(conn, "acct", "w2", 2, ttl) == 1
        # w1 died: its slot is free once it expired (by the database's clock), not before.
        conn.execute(
            update(imap_connection_slots)
            .where(imap_connection_slots.c.holder == "w1")
            .values(expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
        assert connection_slots.renew_holder_slots(conn, "w2", ttl) == {"acct": {1}, "other": {0}}
        assert connection_slots.acquire_slot(conn, "acct", "w3", 2, ttl) == 0
        assert connection_slots.renew_holder_slots(conn, "w1", ttl) == {}  # its slot is w3's now


def test_workers_of_one_account_stay_within_its_connection_budget(db_url: str) -> None:
    # Two workers, eight folders, a budget of five: alone, the first would IDLE on four folders
    # and the second on four more (eight connections; the server allows more here). Counted by
    # Dovecot itself, the two together never hold more than five, and every folder's new mail is
    # still indexed (by IDLE or over a worker's shared connection).
    folders = ("INBOX", *(f"Box{n}" for n in range(1, 8)))
    with LocalDovecot({ANNA: "anna-pw"}) as dovecot:
        for folder in folders[1:]:
            dovecot.create_folder(ANNA, folder)
        engine = index_engine(db_url)
        config = sync_config(
            account=ANNA, folders=folders, idle_folders=4, max_connections=5, poll_interval_seconds=0.5
        )
        server = imap_config(dovecot, ANNA)
        workers = [
            MailPipeline(engine, server, config, owner=f"host:w{n}", step_seconds=0.05) for n in (1, 2)
        ]
        most = 0

        def count_connections() -> None:
            nonlocal most
            most = max(most, dovecot.logged_in(ANNA))

        def all_indexed(expected: int) -> Callable[[], bool]:
            def check() -> bool:
                count_connections()
                for worker in workers:
                    worker.next_lease_check = 0  # share the slots out again at every step
                return _count(engine, "SELECT count(*) FROM messages") == expected

            return check

        for n, folder in enumerate(folders):
            dovecot.append(ANNA, folder, message(n))
        _run_until(workers, all_indexed(len(folders)), 90)
        assert sum(len(worker.watchers) for worker in workers) == len(folders)
        for n, folder in enumerate(folders):
            dovecot.append(ANNA, folder, message(100 + n))
        _run_until(workers, all_indexed(2 * len(folders)), 90)

        def idling_per_worker() -> list[int]:
            return [sum(watcher.idling for watcher in worker.watchers.values()) for worker in workers]

        def each_idles_on_one() -> bool:
            count_connections()
            return idling_per_worker() == [1, 1]

        # Each worker IDLEs on one folder and polls its other three over one shared connection
        # (once the lease round has given the second worker its share and its slots).
        _run_until(workers, each_idles_on_one, 30)
        most_idling = [0, 0]
        for _ in range(20):
            count_connections()
            for worker in workers:
                worker.run_once()
            most_idling = [max(pair) for pair in zip(most_idling, idling_per_worker(), strict=True)]
        assert 0 < most <= 5, most
        assert most_idling == [1, 1]  # never a second IDLE connection on either worker
        for worker in workers:
            worker.close()
        with engine.connect() as conn:
            assert connection_slots.slots_held(conn, [ANNA]) == {}


def test_logins_to_one_host_are_paced_across_workers(db_url: str) -> None:
    # Eight mailboxes on one server, each watched by a worker of its own, all starting at once: the
    # logins come no faster than IMAP_LOGINS_PER_SECOND, counted in the database between them.
    users = {f"user{n}@example.test": f"pw{n}" for n in range(8)}
    rate = 2.0
    with LocalDovecot(users) as dovecot:
        engine = index_engine(db_url)

        def workers(limits: SignInLimits, tag: str) -> list[MailPipeline]:
            return [
                MailPipeline(
                    engine,
                    imap_config(dovecot, user),
                    sync_config(account=f"{tag}{user}", use_idle=False, poll_interval_seconds=300),
                    owner=f"host:{tag}{user}",
                    step_seconds=0.02,
                    sign_ins=limits,
                )
                for user in users
            ]

        def logged_in(pipelines: list[MailPipeline]) -> Callable[[], bool]:
            return lambda: all(
                "INBOX" in pipeline.watchers and pipeline.watchers["INBOX"].connected
                for pipeline in pipelines
            )

        unpaced = workers(SignInLimits(), "unpaced-")
        _run_until(unpaced, logged_in(unpaced), 60)
        before = sorted(dovecot.login_times())
        for pipeline in unpaced:
            pipeline.close()
        paced = workers(SignInLimits(logins_per_second=rate), "paced-")
        _run_until(paced, logged_in(paced), 60)
        logins = sorted(dovecot.login_times())[len(before) :]
        for pipeline in paced:
            pipeline.close()
    spread = (logins[-1] - logins[0]).total_seconds()
    unpaced_spread = (before[-1] - before[0]).total_seconds()
    print(f"{len(users)} logins: {unpaced_spread:.2f} s apart unpaced, {spread:.2f} s at {rate}/s")
    assert len(logins) == len(users)
    # A login starts every half second: the eighth 3.5 s after the first, two or three in any
    # second. A loaded machine delays a login's answer by a few tenths of a second, hence the
    # margins; unpaced, all eight came within about a second.
    assert spread >= (len(logins) - 1) / rate - 1.0, logins
    in_any_second = max(
        sum(1 for later in logins if 0 <= (later - first).total_seconds() < 1) for first in logins
    )
    assert in_any_second <= rate + 2, logins


def _bulk_message(n: int) -> bytes:
    return message(10_000 + n, subject=f"archived {n}", body=f"an old message, number {n}, " * 20)


def test_a_large_backfill_does_not_delay_another_mailboxs_new_mail(db_url: str) -> None:
    # One worker serves two mailboxes. Anna's inbox holds 20,000 messages of a first sync; a message
    # delivered to Boris meanwhile is indexed within seconds, while Anna's sync is still going on.
    backlog = 20_000
    with LocalDovecot({ANNA: "anna-pw", BORIS: "boris-pw"}) as dovecot:
        dovecot.bulk_load(ANNA, "INBOX", (_bulk_message(n) for n in range(backlog)))
        engine = index_engine(db_url)
        anna = (imap_config(dovecot, ANNA), sync_config(account=ANNA, poll_interval_seconds=300))
        boris = (imap_config(dovecot, BORIS), sync_config(account=BORIS, poll_interval_seconds=300))

        def anna_indexed() -> int:
            return _count(engine, "SELECT count(*) FROM messages WHERE subject LIKE 'archived %'")

        def boris_has(subject: str) -> Callable[[], bool]:
            sql = f"SELECT count(*) FROM messages WHERE subject = '{subject}'"  # noqa: S608  # nosec B608
            return lambda: _count(engine, sql) == 1

        def boris_idles(worker: MailPipeline) -> Callable[[], bool]:
            inbox = worker.accounts[0].watchers
            return lambda: "INBOX" in inbox and inbox["INBOX"].idling

        # The baseline: a worker serving Boris alone.
        alone = MailPipeline(engine, *boris, owner="host:w1", step_seconds=0.05)
        _run_until([alone], boris_idles(alone), 60)
        delivered_at = datetime.now(UTC)
        dovecot.deliver(BORIS, message(0, subject="for boris alone"))
        _run_until([alone], boris_has("for boris alone"), 60)
        baseline = (indexed_at(engine, "for boris alone") - delivered_at).total_seconds()
        alone.close()

        both = MailPipeline(engine, *boris, owner="host:w2", step_seconds=0.05, accounts=[anna])
        _run_until([both], lambda: boris_idles(both)() and anna_indexed() > 0, 60)
        latencies = []
        for n in range(1, 4):
            delivered_at = datetime.now(UTC)
            dovecot.deliver(BORIS, message(n, subject=f"for boris {n}"))
            _run_until([both], boris_has(f"for boris {n}"), 60)
            latencies.append((indexed_at(engine, f"for boris {n}") - delivered_at).total_seconds())
            assert both.accounts[1].watchers["INBOX"].catching_up and anna_indexed() < backlog
        both.close()
    during = [round(seconds, 2) for seconds in latencies]
    print(f"Boris's mail indexed in {during} s during Anna's backfill, {baseline:.2f} s alone")
    assert max(latencies) < 5.0, latencies


@pytest.fixture
def silent_listener() -> Iterator[tuple[str, int, list[socket.socket]]]:
    """A TCP server that accepts connections and never says a word (no IMAP greeting)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    yield "127.0.0.1", server.getsockname()[1], accepted
    server.close()
    for connection in accepted:
        connection.close()


def test_a_server_that_says_nothing_holds_up_only_its_own_account(
    db_url: str, silent_listener: tuple[str, int, list[socket.socket]]
) -> None:
    # Anna's server accepts the connection and then says nothing, for up to its 30 s timeout: the
    # worker's loop does not wait for it, and Boris's new mail is indexed at once.
    host, port, accepted = silent_listener
    with LocalDovecot({BORIS: "boris-pw"}) as dovecot:
        engine = index_engine(db_url)
        anna = (
            imap_config(dovecot, BORIS, host=host, port=port, username=ANNA, timeout_seconds=30.0),
            sync_config(account=ANNA, poll_interval_seconds=300),
        )
        boris = (
            imap_config(dovecot, BORIS),
            sync_config(account=BORIS, poll_interval_seconds=300),
        )
        worker = MailPipeline(engine, *boris, owner="host:w1", step_seconds=0.05, accounts=[anna])
        delivered_at: list[float] = []

        def deliver_while_anna_connects() -> None:
            while not accepted:
                time.sleep(0.01)
            delivered_at.append(time.monotonic())
            dovecot.deliver(BORIS, message(1, subject="for boris"))

        threading.Thread(target=deliver_while_anna_connects, daemon=True).start()
        _run_until([worker], lambda: _count(engine, "SELECT count(*) FROM messages") == 1, 90)
        seconds = time.monotonic() - delivered_at[0]
        assert seconds < 5.0, seconds
        # Anna's connection is still waiting for the greeting: her folder has not synced.
        assert worker.accounts[1].watchers["INBOX"].connecting is not None
        assert worker.accounts[1].watchers["INBOX"].last_sync_at is None
        worker.close()
    print(f"Boris's mail indexed in {seconds:.2f} s beside a silent server")


def test_the_first_login_of_an_account_waits_a_random_part_of_the_jitter(tmp_path: Path) -> None:
    engine = index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    waits: list[float] = []
    with LocalDovecot({ANNA: "anna-pw"}) as dovecot:
        connections = AccountConnections(
            engine,
            ANNA,
            holder="host:w1",
            max_connections=3,
            limits=SignInLimits(startup_jitter_seconds=2.0),
            ttl=timedelta(seconds=30),
            sleep=waits.append,
        )
        clients = [connections.connect(imap_config(dovecot, ANNA)) for _ in range(3)]
        assert dovecot.logged_in(ANNA) == 3
        with pytest.raises(ImapNoConnectionSlotError):
            connections.connect(imap_config(dovecot, ANNA))
        for client in clients:
            client.logout()
        deadline = time.monotonic() + 10
        while connections.held:  # given back a moment after the logout
            assert time.monotonic() < deadline, connections.held
            connections.release_closed([])
            time.sleep(0.1)
    # Once, before the first login only; no pacing asked for.
    assert len(waits) == 1 and 0 <= waits[0] <= 2.0, waits
