"""Work sharing: N pipelines on one database watch each folder once and index each message once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from emailops.pipeline import LEASE_TTL, MailPipeline
from prod.localmail.dovecot import LocalDovecot
from tests.index_helpers import ALICE, imap_config, index_engine, message, rows, sync_config


def test_two_workers_share_folders_without_double_fetching(dovecot: LocalDovecot, db_url: str) -> None:
    dovecot.create_folder(ALICE, "Archive")
    for n in range(1, 11):
        dovecot.append(ALICE, "INBOX", message(n))
        dovecot.append(ALICE, "Archive", message(100 + n))
    engine = index_engine(db_url)
    config = sync_config(folders=("INBOX", "Archive"), poll_interval_seconds=300)
    first = MailPipeline(engine, imap_config(dovecot), config, owner="host:w1", workers=2, step_seconds=0.2)
    second = MailPipeline(engine, imap_config(dovecot), config, owner="host:w2", workers=2, step_seconds=0.2)
    for _ in range(10):
        first.run_once()
        second.run_once()
    assert len(first.watchers) == 1 and len(second.watchers) == 1
    assert set(first.watchers) | set(second.watchers) == {"INBOX", "Archive"}
    dovecot.deliver(ALICE, message(50))
    for _ in range(10):
        first.run_once()
        second.run_once()
    assert rows(engine, "SELECT count(*), count(DISTINCT message_id) FROM messages") == [(21, 21)]

    # The other worker stops and is not replaced: its folder is taken over once nobody has
    # watched it for two lease periods, not before.
    first.close()
    second.next_lease_check = 0
    second.run_once()
    assert len(second.watchers) == 1
    second.clock = lambda: datetime.now(UTC) + 2 * LEASE_TTL + timedelta(seconds=5)
    second.next_lease_check = 0
    second.run_once()
    assert set(second.watchers) == {"INBOX", "Archive"}
    second.close()


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

        for _ in range(30):
            pipeline.run_once()
        assert indexed() == len(folders)
        idling = [folder for folder, watcher in pipeline.watchers.items() if watcher.idling]
        assert idling == ["INBOX", "Box1"]
        for n, folder in enumerate(folders):
            dovecot.append(ALICE, folder, message(100 + n))  # a connection of the test's own, too
        for _ in range(30):
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
