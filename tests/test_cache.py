"""The raw-message cache: bounded in size, and what reindex rebuilds from."""

from __future__ import annotations

import time
from pathlib import Path

from structlog.testing import capture_logs

from emailops.cache import RawMessageCache
from emailops.imap.connection import connect
from emailops.maintenance import reindex
from emailops.search.service import SearchOptions, search
from emailops.store.database import reading
from localmail.dovecot import LocalDovecot
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, message, sync_config


def test_a_cache_that_cannot_be_written_is_told_once_and_costs_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "raw").write_text("a file where the cache's folder should be")
    cache = RawMessageCache(tmp_path, max_bytes=10_000)
    with capture_logs() as logs:
        cache.put_many("acct", "INBOX", 7, {1: b"a" * 900})
        cache.put_many("acct", "INBOX", 7, {2: b"b" * 900})
    assert [entry["event"] for entry in logs] == [
        "raw message cache not writable; indexing goes on, reindex will download again"
    ]
    assert logs[0]["cache_dir"] == str(tmp_path) and logs[0]["log_level"] == "warning"
    assert cache.get_many("acct", "INBOX", 7, [1, 2]) == {}


def test_cache_round_trip_and_size_bound(tmp_path: Path) -> None:
    cache = RawMessageCache(tmp_path, max_bytes=10_000)
    cache.put_many("acct", "INBOX", 7, {1: b"a" * 900, 2: b"b" * 900})
    assert cache.get_many("acct", "INBOX", 7, [1, 2, 3]) == {1: b"a" * 900, 2: b"b" * 900}
    assert cache.get_many("acct", "INBOX", 8, [1]) == {}  # another UIDVALIDITY is another message
    assert cache.get_many("acct", "Archive", 7, [1]) == {}
    for uid in range(3, 30):
        time.sleep(0.001)
        cache.put_many("acct", "INBOX", 7, {uid: bytes([uid]) * 900})
    stored = sum(f.stat().st_size for f in (tmp_path / "raw").rglob("*.eml"))
    assert stored <= 10_000
    # The oldest went first.
    assert 1 not in cache.get_many("acct", "INBOX", 7, [1]) and 29 in cache.get_many("acct", "INBOX", 7, [29])


def test_a_cache_file_cut_short_is_ignored(tmp_path: Path) -> None:
    """A crash or a full disk mid-write leaves a short file: it reads as absent, never as mail."""
    cache = RawMessageCache(tmp_path, max_bytes=10_000)
    cache.put_many("acct", "INBOX", 7, {1: b"a" * 900, 2: b"b" * 900})
    (first,) = (tmp_path / "raw").rglob("1-900.eml")
    first.write_bytes(b"a" * 400)
    assert cache.get_many("acct", "INBOX", 7, [1, 2]) == {2: b"b" * 900}
    # A name without the length cannot tell a whole file from a cut one: it is not read.
    first.with_name("3.eml").write_bytes(b"c" * 10)
    assert cache.get_many("acct", "INBOX", 7, [3]) == {}


def test_cache_write_failure_costs_nothing_but_the_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = RawMessageCache(blocker, max_bytes=10_000)
    cache.put_many("acct", "INBOX", 1, {1: b"x"})  # no exception
    assert cache.get_many("acct", "INBOX", 1, [1]) == {}


def test_reindex_reads_raw_messages_from_the_cache(dovecot: LocalDovecot, tmp_path: Path) -> None:
    for n in (1, 2):
        dovecot.append(ALICE, "INBOX", message(n))
    engine = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    config = sync_config(tmp_path)
    reindex(engine, imap_config(dovecot), config, connector=connect)
    # Doctor the cached copy of UID 1: a rebuild that uses the cache indexes the doctored text.
    (cached,) = [p for p in (tmp_path / "cache" / "raw").rglob("1-*.eml")]
    doctored = message(1, body="from the cache capybara")
    cached.unlink()
    cached.with_name(f"1-{len(doctored)}.eml").write_bytes(doctored)
    reindex(engine, imap_config(dovecot), config, connector=connect)
    with reading(engine) as conn:
        assert [h.uid for h in search(conn, ACCOUNT, "capybara", SearchOptions())] == [1]
        assert [h.uid for h in search(conn, ACCOUNT, "token2x", SearchOptions())] == [2]


def test_a_listing_is_a_snapshot_read_by_later_batches(tmp_path: Path) -> None:
    cache = RawMessageCache(tmp_path, max_bytes=10**6)
    cache.put_many("acct", "INBOX", 7, {1: b"a" * 900})
    copies = cache.listing("acct", "INBOX", 7)
    assert copies == {1: ("1-900.eml", 900)}
    cache.put_many("acct", "INBOX", 7, {2: b"b" * 900})
    assert cache.get_many("acct", "INBOX", 7, [1, 2], copies) == {1: b"a" * 900}
    assert cache.get_many("acct", "INBOX", 7, [1, 2]) == {1: b"a" * 900, 2: b"b" * 900}


def test_one_message_is_read_only_whole_and_of_the_size_asked(tmp_path: Path) -> None:
    cache = RawMessageCache(tmp_path, 10_000)
    cache.put_many(ACCOUNT, "INBOX", 7, {3: b"whole message"})
    assert cache.get_one(ACCOUNT, "INBOX", 7, 3, 13) == b"whole message"
    assert cache.get_one(ACCOUNT, "INBOX", 7, 3, 14) is None  # the index says another size
    assert cache.get_one(ACCOUNT, "INBOX", 8, 3, 13) is None  # another UIDVALIDITY
    ((path,),) = [list((tmp_path / "raw").glob("*/7/3-13.eml"))]
    path.write_bytes(b"whole")  # cut short by a crash
    assert cache.get_one(ACCOUNT, "INBOX", 7, 3, 13) is None
