"""Incremental sync against Dovecot and Cyrus: initial sync, new mail, flags, expunges, UIDVALIDITY."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from emailops.imap.connection import connect
from emailops.imap.sync import FolderSync
from emailops.search.service import SearchOptions, search
from emailops.store import messages as message_store
from emailops.store.database import reading
from localmail.dovecot import LocalDovecot
from localmail.imap_server import LocalImapServer
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, message, rows, sync_config


def test_initial_sync_indexes_everything_without_touching_flags(
    imap_server: LocalImapServer, db_url: str, tmp_path: Path
) -> None:
    for n in range(1, 31):
        imap_server.append(ALICE, "INBOX", message(n), flags=("\\Flagged",) if n == 7 else ())
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    report = FolderSync(engine, sync_config(tmp_path, fetch_batch_messages=7), "INBOX").sync(client)

    assert report.new == 30 and report.complete
    assert rows(engine, "SELECT count(*), count(DISTINCT uid) FROM messages") == [(30, 30)]
    assert rows(engine, "SELECT flags FROM messages WHERE uid = 7") == [("\\Flagged",)]
    # Mail that was there before the first sync is history: never answered.
    assert rows(engine, "SELECT DISTINCT rules_state FROM messages") == [("history",)]
    # BODY.PEEK: nothing became \Seen on the server.
    client.select_folder("INBOX", readonly=True)
    flags = client.get_flags(client.search("ALL"))
    assert not any(b"\\Seen" in f for f in flags.values())
    with reading(engine) as conn:
        hits = search(conn, ACCOUNT, "token17x", SearchOptions())
    assert [(h.uid, h.subject, h.sender) for h in hits] == [
        (17, "note 17", "Sender 17 <sender17@example.org>")
    ]


def test_poll_with_nothing_new_changes_nothing(imap_server: LocalImapServer, db_url: str) -> None:
    for n in range(1, 6):
        imap_server.append(ALICE, "INBOX", message(n))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(client)
    again = sync.sync(client)
    assert (again.new, again.flags_changed, again.expunged) == (0, 0, 0)
    assert rows(engine, "SELECT count(*) FROM messages") == [(5,)]


def test_new_mail_flags_and_expunge_are_applied(imap_server: LocalImapServer, db_url: str) -> None:
    for n in range(1, 6):
        imap_server.append(ALICE, "INBOX", message(n))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(client)

    imap_server.deliver(ALICE, message(6))
    with imap_server.imap(ALICE) as other:
        other.select_folder("INBOX")
        other.add_flags([2], [b"\\Answered"])
        other.delete_messages([3])
        other.expunge()
    report = sync.sync(client)

    # The new message comes back from CHANGEDSINCE too (its MODSEQ is new); it is not a flag change.
    assert report.new == 1 and report.flags_changed == 1 and report.expunged == 1
    assert rows(engine, "SELECT uid, rules_state FROM messages WHERE uid = 6") == [(6, "pending")]
    assert rows(engine, "SELECT flags FROM messages WHERE uid = 2") == [("\\Answered",)]
    # The expunged message is kept and marked, not dropped; search no longer shows it.
    assert rows(engine, "SELECT uid FROM messages WHERE expunged_at IS NOT NULL") == [(3,)]
    with reading(engine) as conn:
        assert search(conn, ACCOUNT, "token3x", SearchOptions()) == []


def test_new_mail_alone_is_reported_as_no_flag_change(imap_server: LocalImapServer, db_url: str) -> None:
    imap_server.append(ALICE, "INBOX", message(1))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(client)
    for n in range(2, 5):
        imap_server.deliver(ALICE, message(n))
    report = sync.sync(client)
    assert report.new == 3 and report.flags_changed == 0


def test_flags_and_expunges_without_condstore_by_reconcile(db_url: str) -> None:
    with LocalDovecot({ALICE: "alice-pw"}, capabilities_removed={"CONDSTORE", "QRESYNC"}) as dovecot:
        for n in range(1, 6):
            dovecot.append(ALICE, "INBOX", message(n))
        engine = index_engine(db_url)
        client = connect(imap_config(dovecot))
        assert not client.has_capability("CONDSTORE")
        sync = FolderSync(engine, sync_config(), "INBOX")
        sync.sync(client)
        with dovecot.imap(ALICE) as other:
            other.select_folder("INBOX")
            other.add_flags([4], [b"\\Flagged"])
            other.delete_messages([5])
            other.expunge()
        report = sync.sync(client, reconcile=True)
    assert report.flags_changed == 1 and report.expunged == 1
    assert rows(engine, "SELECT flags FROM messages WHERE uid = 4") == [("\\Flagged",)]
    assert rows(engine, "SELECT uid FROM messages WHERE expunged_at IS NOT NULL") == [(5,)]


def test_uidvalidity_change_remaps_by_message_id(imap_server: LocalImapServer, db_url: str) -> None:
    imap_server.create_folder(ALICE, "Projects")
    for n in range(1, 5):
        imap_server.append(ALICE, "Projects", message(n))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(folders=("Projects",)), "Projects")
    sync.sync(client)
    with engine.begin() as conn:  # pretend message 4 arrived after the first sync and was answered
        conn.exec_driver_sql("UPDATE messages SET rules_state = 'done' WHERE uid = 4")
    before = rows(engine, "SELECT id, message_id FROM messages ORDER BY id")

    imap_server.delete_folder(ALICE, "Projects")
    imap_server.create_folder(ALICE, "Projects")
    # The recreated mailbox: messages 2..4 again (new UIDs, new order), 1 gone, 5 new.
    for n in (4, 3, 2, 5):
        imap_server.append(ALICE, "Projects", message(n))
    report = sync.sync(client)

    assert report.resynced
    live = rows(
        engine, "SELECT id, message_id, uid, rules_state FROM messages WHERE expunged_at IS NULL ORDER BY id"
    )
    by_message_id = {mid: (pk, uid, state) for pk, mid, uid, state in live}
    assert len(live) == 4 and len(by_message_id) == 4, live
    # Same rows (primary keys) for the messages that came back, re-mapped to their new UIDs.
    old_pk = {mid: pk for pk, mid in before}
    for n, new_uid in ((4, 1), (3, 2), (2, 3)):
        mid = f"<note-{n}@example.org>"
        assert by_message_id[mid][:2] == (old_pk[mid], new_uid)
    assert by_message_id["<note-4@example.org>"][2] == "done"
    # Message 5 appeared during the resync: counted as already there, never answered.
    assert by_message_id["<note-5@example.org>"][2] == "history"
    assert rows(engine, "SELECT message_id FROM messages WHERE expunged_at IS NOT NULL") == [
        ("<note-1@example.org>",)
    ]
    assert rows(engine, "SELECT count(*) FROM messages") == [(5,)]


def test_uidvalidity_change_takes_the_flags_of_the_new_generation(
    imap_server: LocalImapServer, db_url: str
) -> None:
    """A re-mapped row describes the message now on the server, flags included (found by the
    crash harness: the old flags stayed, while a sync from scratch saw the new ones)."""
    imap_server.create_folder(ALICE, "Projects")
    imap_server.append(ALICE, "Projects", message(1), flags=[r"\Seen"])
    imap_server.append(ALICE, "Projects", message(2))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(folders=("Projects",)), "Projects")
    sync.sync(client)

    imap_server.delete_folder(ALICE, "Projects")
    imap_server.create_folder(ALICE, "Projects")
    imap_server.append(ALICE, "Projects", message(1))
    imap_server.append(ALICE, "Projects", message(2), flags=[r"\Flagged"])
    assert sync.sync(client).resynced
    assert rows(engine, "SELECT uid, message_id, flags FROM messages ORDER BY uid") == [
        (1, "<note-1@example.org>", ""),
        (2, "<note-2@example.org>", "\\Flagged"),
    ]


def test_a_flag_change_announced_during_a_pass_is_not_given_to_another_uid(
    imap_server: LocalImapServer, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dovecot tells of another session's flag change with an untagged FETCH that names the message
    by sequence number only, even inside a UID FETCH. Read as a UID, it flagged another message
    (found by the crash harness: the rules' $AutoReplied of UID 305 landed on UID 291)."""
    for n in range(1, 8):
        imap_server.append(ALICE, "INBOX", message(n))
    with imap_server.imap(ALICE) as other:
        other.select_folder("INBOX")
        other.delete_messages([2])
        other.expunge()  # from here on, sequence number 5 is UID 6
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(client)

    real_select = FolderSync.select

    def select_then_another_session_flags_uid_6(self: FolderSync, imap: object) -> object:
        status = real_select(self, imap)  # type: ignore[arg-type]
        with imap_server.imap(ALICE) as other:
            other.select_folder("INBOX")
            other.add_flags([6], [b"$AutoReplied"])
        return status

    with imap_server.imap(ALICE) as other:
        other.select_folder("INBOX")
        other.add_flags([7], [b"\\Flagged"])  # HIGHESTMODSEQ moves: the pass asks CHANGEDSINCE
    monkeypatch.setattr(FolderSync, "select", select_then_another_session_flags_uid_6)
    sync.sync(client)
    monkeypatch.undo()
    sync.sync(client)  # the announcement skipped by the pass is seen by the next one

    assert rows(engine, "SELECT uid, flags FROM messages WHERE flags != '' ORDER BY uid") == [
        (6, "$AutoReplied"),
        (7, "\\Flagged"),
    ]


def test_a_message_above_the_size_limit_keeps_its_flags_and_date(
    imap_server: LocalImapServer, db_url: str
) -> None:
    big = message(1, body="large " * 40_000)  # 240 kB, above the 64 kB limit below
    imap_server.append(ALICE, "INBOX", big, flags=[r"\Seen", r"\Flagged"])
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    FolderSync(engine, sync_config(max_message_bytes=64 * 1024), "INBOX").sync(client)
    ((flags, truncated, dated),) = rows(
        engine, "SELECT flags, truncated, internal_date IS NOT NULL FROM messages"
    )
    assert set(str(flags).split()) == {"\\Seen", "\\Flagged"} and truncated and dated


@pytest.mark.parametrize("interrupted", ["by its time budget", "after a UIDVALIDITY re-map"])
def test_flags_changed_while_a_sync_was_unfinished_are_taken(
    imap_server: LocalImapServer, db_url: str, interrupted: str
) -> None:
    """Until a pass completes, no HIGHESTMODSEQ is recorded to ask CHANGEDSINCE from: the pass that
    completes compares every flag (found by the crash harness: a worker killed after a re-map lost
    the flag changes made before its replacement's first pass)."""
    imap_server.create_folder(ALICE, "Projects")
    for n in range(1, 121):
        imap_server.append(ALICE, "Projects", message(n))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    config = sync_config(folders=("Projects",), fetch_batch_messages=50)
    sync = FolderSync(engine, config, "Projects")
    if interrupted == "by its time budget":
        assert not sync.sync(client, budget_seconds=0).complete  # UIDs 1 to 50 indexed
    else:
        sync.sync(client)
        with engine.begin() as conn:  # as left by a worker killed after the re-map's commit
            conn.exec_driver_sql(
                "UPDATE folders SET highestmodseq = NULL, uidnext = NULL, server_count = NULL"
            )
    with imap_server.imap(ALICE) as other:
        other.select_folder("Projects")
        other.add_flags([1], [b"\\Flagged"])
    while not sync.sync(client).complete:
        pass
    assert rows(engine, "SELECT uid, flags FROM messages WHERE flags != ''") == [(1, "\\Flagged")]
    assert rows(engine, "SELECT count(*) FROM messages") == [(120,)]


def test_expunges_after_an_interrupted_pass_are_seen_even_when_the_count_agrees(
    imap_server: LocalImapServer, db_url: str
) -> None:
    """A pass that stored part of the new mail and stopped (time budget, or killed) leaves the
    progress mark ahead of the last count. As many expunges as it stored made the next pass's count
    agree with "last count + arrivals above the mark", and the expunged messages stayed live
    (found by the crash harness)."""
    for n in range(1, 11):
        imap_server.append(ALICE, "INBOX", message(n))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(fetch_batch_messages=2), "INBOX")
    sync.sync(client)
    for n in range(11, 15):
        imap_server.deliver(ALICE, message(n))
    assert not sync.sync(client, budget_seconds=0).complete  # UIDs 11 and 12 indexed
    with imap_server.imap(ALICE) as other:
        other.select_folder("INBOX")
        other.delete_messages([3, 4])
        other.expunge()
    while not sync.sync(client).complete:
        pass
    assert rows(engine, "SELECT uid FROM messages WHERE expunged_at IS NOT NULL ORDER BY uid") == [(3,), (4,)]
    assert rows(engine, "SELECT count(*) FROM messages WHERE expunged_at IS NULL") == [(12,)]


def test_partial_passes_resume_where_they_stopped(imap_server: LocalImapServer, db_url: str) -> None:
    imap_server.bulk_load(ALICE, "INBOX", (message(n) for n in range(1, 401)))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(fetch_batch_messages=50), "INBOX")
    first = sync.sync(client, budget_seconds=0)
    assert not first.complete and first.new == 50
    passes = 1
    while not sync.sync(client, budget_seconds=0).complete:
        passes += 1
    assert passes == 7
    assert rows(engine, "SELECT count(*), count(DISTINCT uid), min(uid), max(uid) FROM messages") == [
        (400, 400, 1, 400)
    ]


@pytest.mark.parametrize("resume_from_scratch", [False, True])
def test_interrupted_first_sync_neither_loses_nor_duplicates(
    imap_server: LocalImapServer, db_url: str, resume_from_scratch: bool
) -> None:
    """A pass killed between batches (process death): the next pass completes the folder."""
    imap_server.bulk_load(ALICE, "INBOX", (message(n) for n in range(1, 101)))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(fetch_batch_messages=30), "INBOX")
    sync.sync(client, budget_seconds=0)
    if resume_from_scratch:  # as if the progress marker was lost too: dedup by (uidvalidity, uid)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE folders SET uidnext = NULL")
    client = connect(imap_config(imap_server))
    report = FolderSync(engine, sync_config(fetch_batch_messages=30), "INBOX").sync(client)
    assert report.complete
    assert rows(engine, "SELECT count(*), count(DISTINCT uid) FROM messages") == [(100, 100)]


def test_a_batch_that_fails_to_store_stops_the_pass_and_the_next_pass_fills_it(
    imap_server: LocalImapServer, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are stored by a thread while later ones download and parse. When one fails, none
    after it is stored: its progress mark would claim the failed batch as indexed."""
    imap_server.bulk_load(ALICE, "INBOX", (message(n) for n in range(1, 401)))  # parsed by the helper
    engine = index_engine(db_url)
    insert = message_store.insert_messages
    calls: list[int] = []

    def fail_the_second_batch(*args: object, **kwargs: object) -> list[int]:
        calls.append(1)
        if len(calls) == 2:
            raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        return insert(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(message_store, "insert_messages", fail_the_second_batch)
    client = connect(imap_config(imap_server))
    with pytest.raises(OperationalError):
        FolderSync(engine, sync_config(fetch_batch_messages=50), "INBOX").sync(client)
    assert len(calls) == 2
    assert rows(engine, "SELECT count(*), max(uid) FROM messages") == [(50, 50)]
    assert rows(engine, "SELECT uidnext FROM folders") == [(51,)]

    monkeypatch.setattr(message_store, "insert_messages", insert)
    report = FolderSync(engine, sync_config(fetch_batch_messages=50), "INBOX").sync(
        connect(imap_config(imap_server))
    )
    assert report.complete and report.new == 350
    assert rows(engine, "SELECT count(*), count(DISTINCT uid), max(uid) FROM messages") == [(400, 400, 400)]


def test_a_poll_with_nothing_new_is_one_status_command(
    imap_server: LocalImapServer, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(1, 4):
        imap_server.append(ALICE, "INBOX", message(n))
    engine = index_engine(db_url)
    client = connect(imap_config(imap_server))
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(client)
    commands: list[str] = []
    for name in ("select_folder", "folder_status", "fetch", "search", "noop"):
        original = getattr(client, name)

        def spy(*args: object, _name: str = name, _original: object = original, **kwargs: object) -> object:
            commands.append(_name)
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(client, name, spy)
    assert sync.sync(client).new == 0
    assert commands == ["folder_status"]
    commands.clear()
    imap_server.deliver(ALICE, message(4))
    assert sync.sync(client).new == 1
    assert commands[:2] == ["folder_status", "select_folder"]
