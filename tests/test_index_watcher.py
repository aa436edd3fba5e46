"""The folder watcher against Dovecot and Cyrus: IDLE, polling, dropped connections, restarts, bad mail."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from emailops.imap.sync import FolderSync
from emailops.imap.watcher import FolderWatcher
from emailops.search.service import SearchOptions, search
from emailops.store import messages as message_store
from emailops.store.database import reading
from localmail.dovecot import LocalDovecot
from localmail.imap_server import LocalImapServer
from tests.corpus.hostile import hostile_corpus, write_huge_attachment
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, message, rows, sync_config


def step_until(watcher: FolderWatcher, done: Callable[[], bool], timeout: float = 20.0) -> float:
    """Step the watcher until ``done()``; return the seconds it took."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not done after {timeout} s")
        watcher.step(0.2)
    return time.monotonic() - started


def count(engine: Engine) -> int:
    return int(rows(engine, "SELECT count(*) FROM messages")[0][0])  # type: ignore[call-overload]


def watcher_for(imap_server: LocalImapServer, engine: Engine, **config: object) -> FolderWatcher:
    sync_cfg = sync_config(**config)
    return FolderWatcher(imap_config(imap_server), sync_cfg, FolderSync(engine, sync_cfg, "INBOX"))


def test_new_mail_is_indexed_at_once_with_idle(imap_server: LocalImapServer, db_url: str) -> None:
    engine = index_engine(db_url)
    # A long poll interval: only IDLE can bring the new message in time.
    watcher = watcher_for(imap_server, engine, poll_interval_seconds=300)
    step_until(watcher, lambda: watcher.idling)
    for n in range(1, 4):
        imap_server.deliver(ALICE, message(n))
        # Generous on a busy machine (about 0.1 s here); the poll would take 300 s.
        step_until(watcher, lambda n=n: count(engine) == n, timeout=10)
    with reading(engine) as conn:
        assert [h.uid for h in search(conn, ACCOUNT, "token2x", SearchOptions())] == [2]
    watcher.close()


def test_without_idle_the_folder_is_polled(db_url: str) -> None:
    with LocalDovecot({ALICE: "alice-pw"}, capabilities_removed={"IDLE"}) as dovecot:
        engine = index_engine(db_url)
        watcher = watcher_for(dovecot, engine, poll_interval_seconds=0.5)
        step_until(watcher, lambda: watcher.connected)
        assert not watcher.idling
        dovecot.deliver(ALICE, message(1))
        step_until(watcher, lambda: count(engine) == 1, timeout=5)
        watcher.close()


def test_connection_killed_mid_fetch_recovers_without_duplicates(
    imap_server: LocalImapServer, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    imap_server.bulk_load(ALICE, "INBOX", (message(n) for n in range(1, 301)))
    engine = index_engine(db_url)
    insert = message_store.insert_messages
    kills: list[int] = []

    def insert_then_kill(*args: object, **kwargs: object) -> list[int]:
        inserted = insert(*args, **kwargs)  # type: ignore[arg-type]
        if not kills:
            kills.append(imap_server.kill_imap_connections(ALICE))
        return inserted

    monkeypatch.setattr(message_store, "insert_messages", insert_then_kill)
    watcher = watcher_for(imap_server, engine, fetch_batch_messages=40)
    step_until(watcher, lambda: count(engine) == 300 and watcher.idling, timeout=30)
    assert kills and kills[0] >= 1
    assert watcher.failures == 0  # reconnected
    assert rows(engine, "SELECT count(DISTINCT uid), min(uid), max(uid) FROM messages") == [(300, 1, 300)]
    watcher.close()


def test_server_restart_while_idle_then_mail_delivered_meanwhile(
    imap_server: LocalImapServer, db_url: str
) -> None:
    engine = index_engine(db_url)
    watcher = watcher_for(imap_server, engine, poll_interval_seconds=300)
    step_until(watcher, lambda: watcher.idling)
    imap_server.stop()
    step_until(watcher, lambda: not watcher.connected, timeout=10)
    watcher.step(0.1)  # a failed reconnect while the server is down
    imap_server.start()
    imap_server.deliver(ALICE, message(1))
    step_until(watcher, lambda: count(engine) == 1, timeout=20)
    watcher.close()


def test_a_folder_missing_on_the_server_is_told_and_checked_again_slowly(
    imap_server: LocalImapServer, db_url: str
) -> None:
    # A typo in EMAIL_FOLDERS is not a connection failure: no reconnect every second (a login storm
    # that gets accounts locked), an error that names the folder, and indexing once it exists.
    engine = index_engine(db_url)
    now = [1000.0]
    sync_cfg = sync_config()
    watcher = FolderWatcher(
        imap_config(imap_server),
        sync_cfg,
        FolderSync(engine, sync_cfg, "Projects"),
        monotonic=lambda: now[0],
        sleep=lambda seconds: now.__setitem__(0, now[0] + seconds),
    )
    delays = []
    with capture_logs() as logs:
        for _ in range(2):
            now[0] = watcher.next_connect_at
            assert watcher.step(0.1) is None
            assert not watcher.connected
            delays.append(watcher.next_connect_at - now[0])
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 2 and "check EMAIL_FOLDERS" in errors[0]["event"]
    assert errors[0]["folder"] == "Projects" and "does not exist" in errors[0]["error"]
    assert not any(entry["event"] == "IMAP connection failed" for entry in logs)
    assert delays[0] >= 50 and delays[1] > delays[0]  # a minute, then longer

    imap_server.create_folder(ALICE, "Projects")
    imap_server.append(ALICE, "Projects", message(1))
    now[0] = watcher.next_connect_at
    report = watcher.step(0.1)
    assert report is not None and report.new == 1 and watcher.failures == 0
    watcher.close()


def test_hostile_corpus_is_fully_indexed_and_searchable(
    dovecot: LocalDovecot, db_url: str, tmp_path: Path
) -> None:
    # Dovecot only: Cyrus refuses messages with NUL bytes at APPEND, and the corpus has some.
    corpus = hostile_corpus()
    for _name, raw in corpus:
        dovecot.append(ALICE, "INBOX", raw)
    huge = write_huge_attachment(tmp_path / "huge.eml")
    dovecot.append(ALICE, "INBOX", huge.read_bytes())
    huge.unlink()
    engine = index_engine(db_url)
    watcher = watcher_for(dovecot, engine, max_message_bytes=5 * 1024 * 1024)
    step_until(watcher, lambda: watcher.idling, timeout=60)
    assert count(engine) == len(corpus) + 1
    assert rows(engine, "SELECT count(DISTINCT uid) FROM messages") == [(len(corpus) + 1,)]
    with reading(engine) as conn:
        for word in ("armadillo", "narwhal", "flamingo", "manatee", "toucan"):
            assert search(conn, ACCOUNT, word, SearchOptions()), word
        assert search(conn, ACCOUNT, "scriptword", SearchOptions()) == []
    truncated = rows(
        engine, "SELECT truncated, size > 50000000 FROM messages WHERE subject = 'huge attachment'"
    )
    assert truncated == [(True, True)]
    # Header values stored single-line whatever the message held.
    for (subject,) in rows(engine, "SELECT subject FROM messages"):
        assert "\r" not in str(subject) and "\n" not in str(subject)
    watcher.close()


def test_mail_arriving_during_a_pass_is_not_left_for_the_next_poll(
    imap_server: LocalImapServer, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(1, 4):
        imap_server.append(ALICE, "INBOX", message(n))
    engine = index_engine(db_url)
    insert = message_store.insert_messages
    delivered: list[bool] = []

    def insert_while_mail_arrives(*args: object, **kwargs: object) -> list[int]:
        if not delivered:  # during the first pass, after its SELECT
            imap_server.deliver(ALICE, message(99))
            delivered.append(True)
        return insert(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(message_store, "insert_messages", insert_while_mail_arrives)
    watcher = watcher_for(imap_server, engine, poll_interval_seconds=300)
    took = step_until(watcher, lambda: count(engine) == 4 and watcher.idling, timeout=10)
    assert took < 5  # not the 300 s poll
    watcher.close()


def test_idle_over_implicit_tls(dovecot_tls: LocalDovecot, db_url: str) -> None:
    from emailops.config import TlsSecurity

    assert dovecot_tls.imaps_port is not None
    engine = index_engine(db_url)
    config = sync_config(poll_interval_seconds=300)
    server = imap_config(
        dovecot_tls, port=dovecot_tls.imaps_port, security=TlsSecurity.SSL, ca_file=dovecot_tls.ca_file
    )
    watcher = FolderWatcher(server, config, FolderSync(engine, config, "INBOX"))
    step_until(watcher, lambda: watcher.idling)
    for n in (1, 2):
        dovecot_tls.deliver(ALICE, message(n))
        step_until(watcher, lambda n=n: count(engine) == n, timeout=5)
    watcher.close()


def test_idle_connection_closed_without_bye_is_dropped_at_once_without_spinning(
    imap_server: LocalImapServer, db_url: str
) -> None:
    # A server restart, a NAT gateway or a load balancer may close an IDLE connection with no BYE.
    # A closed socket is always readable and imapclient's idle_check() returns [] at end of file:
    # the watcher must see the end at once and reconnect, not spin on the socket until the next poll.
    engine = index_engine(db_url)
    watcher = watcher_for(imap_server, engine, poll_interval_seconds=300)
    step_until(watcher, lambda: watcher.idling)
    assert imap_server.kill_imap_connections(ALICE) >= 1  # the kernel closes the socket: FIN, no BYE
    imap_server.deliver(ALICE, message(1))
    cpu_before, wall_before = time.process_time(), time.monotonic()
    with capture_logs() as logs:
        step_until(watcher, lambda: count(engine) == 1, timeout=20)
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - wall_before
    assert any(entry["event"] == "IMAP connection failed" for entry in logs)
    assert cpu < 0.5 * wall + 0.5, f"{cpu:.2f} s of CPU in {wall:.2f} s"
    watcher.close()


def test_an_idle_connection_with_nothing_to_say_is_kept(imap_server: LocalImapServer, db_url: str) -> None:
    # Over plaintext, "nothing to read yet" once looked like a close (or like input): the IDLE
    # connection was left for a sync pass at every step, a round of commands a second.
    engine = index_engine(db_url)
    watcher = watcher_for(imap_server, engine, poll_interval_seconds=300)
    step_until(watcher, lambda: watcher.idling)
    client = watcher.client
    with capture_logs() as logs:
        reports = [watcher.step(0.2) for _ in range(10)]
    assert reports == [None] * 10  # no sync pass: nothing happened
    assert watcher.client is client and watcher.idling and watcher.failures == 0
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")]
    watcher.close()


def test_a_server_that_stops_answering_during_idle_holds_no_step(dovecot: LocalDovecot, db_url: str) -> None:
    # The server stops answering while the folder IDLEs (a stalled proxy: commands reach it,
    # answers never come back). Ending IDLE must not wait for its answer inside a step: a worker
    # steps every account's folders in one loop, and each step is bounded by its own wait.
    from bench.imap_proxy import CountingProxy

    engine = index_engine(db_url)
    with CountingProxy(dovecot.host, dovecot.imap_port) as proxy:
        config = sync_config(poll_interval_seconds=300)
        server = imap_config(dovecot, port=proxy.port, timeout_seconds=3.0)
        watcher = FolderWatcher(server, config, FolderSync(engine, config, "INBOX"))
        step_until(watcher, lambda: watcher.idling)
        proxy.stalled = True
        watcher.request_sync()  # the operator's "fetch now": IDLE must end
        longest = 0.0
        with capture_logs() as logs:
            deadline = time.monotonic() + 20
            while watcher.connected:
                assert time.monotonic() < deadline, "the silent connection was never dropped"
                started = time.monotonic()
                watcher.step(0.05)
                longest = max(longest, time.monotonic() - started)
        assert longest < 1.0, longest
        assert "DONE" in proxy.snapshot().commands
        assert watcher.last_error is not None and "did not answer DONE" in str(watcher.last_error)
        # Named by account: a worker serves several, and the folder's name alone says whose.
        assert any(e["event"] == "IMAP connection failed" and e["account"] == ACCOUNT for e in logs)
        watcher.close()
    # The same watcher IDLEs again on a server that answers.
    proxy_free = imap_config(dovecot)
    watcher = FolderWatcher(proxy_free, config, FolderSync(engine, config, "INBOX"))
    step_until(watcher, lambda: watcher.idling)
    dovecot.deliver(ALICE, message(1))
    step_until(watcher, lambda: count(engine) == 1, timeout=10)
    watcher.close()
