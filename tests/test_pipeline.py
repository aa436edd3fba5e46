"""Work sharing: N pipelines on one database watch each folder once and index each message once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from structlog.testing import capture_logs

from emailops.config import ServerConfig, TlsSecurity
from emailops.pipeline import LEASE_TTL, MailPipeline
from emailops.store.schema import lease_workers
from localmail.dovecot import LocalDovecot
from tests.index_helpers import (
    ALICE,
    age_leases,
    daemon_env,
    imap_config,
    index_engine,
    message,
    rows,
    sync_config,
)


def test_two_workers_share_folders_without_double_fetching(dovecot: LocalDovecot, db_url: str) -> None:
    dovecot.create_folder(ALICE, "Archive")
    for n in range(1, 11):
        dovecot.append(ALICE, "INBOX", message(n))
        dovecot.append(ALICE, "Archive", message(100 + n))
    engine = index_engine(db_url)
    config = sync_config(folders=("INBOX", "Archive"), poll_interval_seconds=300)
    first = MailPipeline(engine, imap_config(dovecot), config, owner="host:w1", step_seconds=0.2)
    first.run_once()
    # Alone, a worker watches every folder; a second one is given its share at the first's next
    # lease round (one folder given up, then taken).
    assert set(first.watchers) == {"INBOX", "Archive"}
    second = MailPipeline(engine, imap_config(dovecot), config, owner="host:w2", step_seconds=0.2)
    with capture_logs() as logs:
        for _ in range(3):
            for pipeline in (second, first):
                pipeline.run_once()
                pipeline.next_lease_check = 0
    assert len(first.watchers) == 1 and len(second.watchers) == 1
    assert set(first.watchers) | set(second.watchers) == {"INBOX", "Archive"}
    assert [entry["event"] for entry in logs].count("gave a folder up to another worker (its share)") == 1
    dovecot.deliver(ALICE, message(50))
    for _ in range(10):
        first.run_once()
        second.run_once()
    assert rows(engine, "SELECT count(*), count(DISTINCT message_id) FROM messages") == [(21, 21)]

    # The first stops: the second takes its folder at its next round, not after the lease expired.
    first.close()
    second.next_lease_check = 0
    second.run_once()
    assert set(second.watchers) == {"INBOX", "Archive"}
    second.close()


def test_a_worker_that_died_is_taken_over_once_its_lease_and_presence_expired(
    dovecot: LocalDovecot, db_url: str
) -> None:
    dovecot.create_folder(ALICE, "Archive")
    engine = index_engine(db_url)
    config = sync_config(folders=("INBOX", "Archive"), poll_interval_seconds=300)
    dead, live = (
        MailPipeline(engine, imap_config(dovecot), config, owner=f"host-{n}:r{n}:1:w1", step_seconds=0.1)
        for n in (1, 2)
    )
    for _ in range(2):
        for pipeline in (dead, live):
            pipeline.run_once()
            pipeline.next_lease_check = 0
    assert len(dead.watchers) == len(live.watchers) == 1
    # Killed (never closed): until its lease expires, its folder stays its own.
    live.run_once()
    assert len(live.watchers) == 1
    age_leases(engine, LEASE_TTL + timedelta(seconds=1))
    with engine.begin() as conn:
        conn.execute(update(lease_workers).values(expires_at=datetime(2000, 1, 1, tzinfo=UTC)))
    live.next_lease_check = 0
    live.run_once()
    assert set(live.watchers) == {"INBOX", "Archive"}
    live.close()


def test_folders_beyond_the_idle_ones_share_one_polled_connection(db_url: str) -> None:
    # Each IDLE needs a connection of its own, and servers limit them per account (Dovecot: 10 per
    # user and address by default, Gmail: 15). Eight folders, two watched with IDLE, the other six
    # polled in turn over one connection: three connections, and the test's own is the fourth and
    # last the server allows here.
    folders = ("INBOX", *(f"Box{n}" for n in range(1, 8)))
    with LocalDovecot({ALICE: "alice-pw"}, max_connections=4) as dovecot:
        for n, folder in enumerate(folders):
            if folder != "INBOX":
                dovecot.create_folder(ALICE, folder)
            dovecot.append(ALICE, folder, message(n))
        engine = index_engine(db_url)
        config = sync_config(folders=folders, idle_folders=2, poll_interval_seconds=0.3)
        pipeline = MailPipeline(engine, imap_config(dovecot), config, owner="host:w1", step_seconds=0.1)

        def indexed() -> int:
            return int(rows(engine, "SELECT count(*) FROM messages")[0][0])  # type: ignore[call-overload]

        def idling() -> list[str]:
            return [folder for folder, watcher in pipeline.watchers.items() if watcher.idling]

        deadline = time.monotonic() + 20
        while (indexed() < len(folders) or len(idling()) < 2) and time.monotonic() < deadline:
            pipeline.run_once()
        assert indexed() == len(folders)
        assert idling() == ["INBOX", "Box1"]
        for n, folder in enumerate(folders):
            dovecot.append(ALICE, folder, message(100 + n))  # a connection of the test's own, too
        deadline = time.monotonic() + 20
        while indexed() < 2 * len(folders) and time.monotonic() < deadline:
            pipeline.run_once()
        assert indexed() == 2 * len(folders)

        # The shared connection breaks (so do the others): every polled folder gets a new one.
        assert dovecot.kill_imap_connections(ALICE) >= 3
        for n, folder in enumerate(folders):
            dovecot.append(ALICE, folder, message(200 + n))
        deadline = time.monotonic() + 20
        while indexed() < 3 * len(folders) and time.monotonic() < deadline:
            pipeline.run_once()
        assert indexed() == 3 * len(folders)
        pipeline.close()


def test_a_push_on_any_idle_folder_is_handled_at_once(dovecot: LocalDovecot, db_url: str) -> None:
    # The worker waits on all its IDLE connections at once: a push on the last of four folders is
    # not held up behind the others' waits (3/4 of the wait, one after another, before).
    folders = ("INBOX", "Box1", "Box2", "Box3")
    for folder in folders[1:]:
        dovecot.create_folder(ALICE, folder)
    engine = index_engine(db_url)
    config = sync_config(folders=folders, idle_folders=4, poll_interval_seconds=300)
    pipeline = MailPipeline(engine, imap_config(dovecot), config, owner="host:w1", step_seconds=0.1)
    deadline = time.monotonic() + 20
    while not (len(pipeline.watchers) == 4 and all(w.idling for w in pipeline.watchers.values())):
        assert time.monotonic() < deadline, "the four folders are not all idling"
        pipeline.run_once()
    pipeline.step_seconds = 40.0
    dovecot.deliver(ALICE, message(1))  # into INBOX: wakes the first watcher
    dovecot.append(ALICE, "Box3", message(2))
    started = time.monotonic()
    while rows(engine, "SELECT count(*) FROM messages") != [(2,)]:
        assert time.monotonic() - started < 20, "the pushes were not handled"
        pipeline.run_once()
    # Before: each folder waited 10 s in turn, and Box3's push was handled after about 30 s.
    assert time.monotonic() - started < 10
    pipeline.close()


def _watching_pipeline(dovecot: LocalDovecot, engine: Engine, owner: str, **kwargs: object) -> MailPipeline:
    config = sync_config(poll_interval_seconds=300)
    return MailPipeline(engine, imap_config(dovecot), config, owner=owner, step_seconds=0.1, **kwargs)  # type: ignore[arg-type]


def test_a_host_whose_clock_runs_ahead_does_not_take_a_live_lease(dovecot: LocalDovecot, db_url: str) -> None:
    # Leases are timed by the database's clock: a host 45 s ahead (more than the 30 s lease) once
    # found every other host's lease expired and watched their folders too.
    engine = index_engine(db_url)
    first = _watching_pipeline(dovecot, engine, "host-a:r1:1:w1")
    first.run_once()
    assert set(first.watchers) == {"INBOX"}
    ahead = datetime.now(UTC) + timedelta(seconds=45)
    second = _watching_pipeline(dovecot, engine, "host-b:r2:1:w1", clock=lambda: ahead)
    for _ in range(3):
        second.run_once()
        second.next_lease_check = 0
    assert second.watchers == {}
    first.close()
    second.close()


def test_a_paused_holder_that_resumes_after_a_takeover_stops_at_its_first_write(
    dovecot: LocalDovecot, db_url: str
) -> None:
    engine = index_engine(db_url)
    paused = _watching_pipeline(dovecot, engine, "host-a:r1:1:w1")
    deadline = time.monotonic() + 20
    while not (paused.watchers and paused.watchers["INBOX"].idling):
        assert time.monotonic() < deadline
        paused.run_once()
    # Frozen (SIGSTOP, a long GC pause) past its lease: another worker takes the folder over.
    age_leases(engine, LEASE_TTL + timedelta(seconds=1))
    live = _watching_pipeline(dovecot, engine, "host-b:r2:1:w1")
    live.run_once()
    assert set(live.watchers) == {"INBOX"}
    dovecot.deliver(ALICE, message(1))
    with capture_logs() as logs:
        deadline = time.monotonic() + 20
        while "INBOX" in paused.watchers:  # resumed, before its next lease check (5 s away)
            assert time.monotonic() < deadline, "the paused holder kept watching"
            paused.run_once()
    assert any(entry["event"] == "lost the lease of a folder to another worker" for entry in logs)
    deadline = time.monotonic() + 20
    while rows(engine, "SELECT count(*) FROM messages") != [(1,)]:
        assert time.monotonic() < deadline
        live.run_once()
    paused.close()
    live.close()


def test_workers_of_two_containers_with_one_host_name_are_told_apart(
    dovecot: LocalDovecot, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Containers of one compose service can share a host name, and both have a worker 1; each
    # process start has an identity of its own, so only one of them watches the folder.
    from prod.mail_worker import create_unit
    from prod.runtime_settings import RuntimeSettings
    from prod.worker import RUN_ID_ENV

    env = daemon_env(dovecot, tmp_path, INDEX_DB_URL=db_url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = RuntimeSettings.from_env()
    units = []
    for run in ("container-a", "container-b"):
        monkeypatch.setenv(RUN_ID_ENV, run)
        units.append(create_unit(settings, 1))
    assert units[0].owner != units[1].owner
    for _ in range(3):
        for unit in units:
            unit.run_once()
            unit.next_lease_check = 0
    assert sorted(len(unit.watchers) for unit in units) == [0, 1]
    for unit in units:
        unit.close()


def test_the_folders_steps_of_one_iteration_are_bounded_and_the_next_goes_on_from_there(
    tmp_path: Path,
) -> None:
    # Ten folders each taking 0.5 s to step (a first sync right after connecting): an iteration
    # stops stepping them after 2 s, and the next starts with those left, so every folder is
    # stepped within three iterations and the leases and stages wait no longer than that.
    from emailops.pipeline import STEPS_BUDGET_SECONDS

    now = [0.0]
    stepped: list[str] = []

    class SlowWatcher:
        catching_up = False
        connected = True

        def __init__(self, name: str) -> None:
            self.name = name

        def step(self, max_wait: float) -> None:
            stepped.append(self.name)
            now[0] += 0.5

    engine = index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    server = ServerConfig(host="127.0.0.1", port=1, username="u", password="p", security=TlsSecurity.NONE)
    pipeline = MailPipeline(engine, server, sync_config(), owner="host:r:1:w1", monotonic=lambda: now[0])
    names = [f"Box{n}" for n in range(10)]
    pipeline.accounts[0].watchers = {name: SlowWatcher(name) for name in names}  # type: ignore[misc]
    per_iteration = int(STEPS_BUDGET_SECONDS / 0.5)
    for _ in range(3):
        before = len(stepped)
        pipeline._step_watchers()
        assert len(stepped) - before <= per_iteration
    assert sorted(set(stepped)) == sorted(names)
    assert stepped[:5] == names[:5]  # the second iteration went on from the fifth
