"""The fetch-parse-store pipeline on its own, with a download and a store that record their calls."""

from __future__ import annotations

import threading
import time

import pytest

from emailops.config import SyncConfig
from emailops.imap.bulk_fetch import FetchedBody
from emailops.imap.fetch_pipeline import BATCHES_IN_FLIGHT, batches, fetch_parse_store
from emailops.imap.parsing import Parsed

CONFIG = SyncConfig(account="alice@example.org", fetch_batch_messages=2)


def body(uid: int) -> FetchedBody:
    raw = f"Subject: message {uid}\r\nMessage-ID: <{uid}@example.org>\r\n\r\nbody {uid}\r\n".encode()
    return FetchedBody(uid, (), None, None, raw)


class Recorder:
    def __init__(self) -> None:
        self.downloaded: list[list[int]] = []
        self.stored: list[list[int]] = []
        self.subjects: list[str] = []

    def download(self, uids: list[int]) -> list[FetchedBody]:
        self.downloaded.append(uids)
        return [body(uid) for uid in uids]

    def store(self, bodies: list[FetchedBody], contents: Parsed, batch_started: float) -> None:
        self.stored.append([item.uid for item in bodies])
        self.subjects += [str(content.columns["subject"]) for content in contents]


def sizes(uids: range) -> dict[int, int]:
    return {uid: 100 for uid in uids}


def test_batches_are_bounded_by_count_and_bytes() -> None:
    config = SyncConfig(account="a", fetch_batch_messages=3, fetch_batch_bytes=250, max_message_bytes=200)
    found = {1: 100, 2: 100, 3: 100, 4: 10, 5: 10, 6: 10, 7: 10_000, 8: 60}
    # 7 is oversized: it counts for the 200 bytes fetched of it.
    assert list(batches(range(1, 9), found, config)) == [[1, 2], [3, 4, 5], [6, 7], [8]]


def test_every_batch_is_stored_in_order_with_what_the_parser_made_of_it() -> None:
    recorder = Recorder()
    uids = range(1, 8)
    assert fetch_parse_store(uids, sizes(uids), CONFIG, recorder.download, recorder.store)
    assert recorder.stored == [[1, 2], [3, 4], [5, 6], [7]]
    assert recorder.subjects == [f"message {uid}" for uid in uids]


def test_after_a_failed_store_no_later_batch_is_stored() -> None:
    """Batch 2's store fails only once batches 3 and 4 are downloaded, so they reach the store
    thread after it; their progress marks would claim batch 2 as indexed."""
    recorder = Recorder()
    later_downloaded = threading.Event()

    def download(uids: list[int]) -> list[FetchedBody]:
        if uids[0] == 7:
            later_downloaded.set()
        return recorder.download(uids)

    def store(bodies: list[FetchedBody], contents: Parsed, batch_started: float) -> None:
        if bodies[0].uid == 3:
            assert later_downloaded.wait(10)
            raise OSError("disk I/O error")
        recorder.store(bodies, contents, batch_started)

    uids = range(1, 13)
    with pytest.raises(OSError, match="disk I/O error"):
        fetch_parse_store(uids, sizes(uids), CONFIG, download, store)
    assert recorder.stored == [[1, 2]]
    # Batch 5 made four in flight: the pipeline waited for batch 2 and stopped; 6 was never fetched.
    assert recorder.downloaded == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]


def test_at_most_batches_in_flight_are_held_while_the_store_is_behind() -> None:
    recorder = Recorder()
    held_back = threading.Event()
    downloaded_while_held: list[int] = []

    def store(bodies: list[FetchedBody], contents: Parsed, batch_started: float) -> None:
        if bodies[0].uid == 1:
            assert held_back.wait(10)
        recorder.store(bodies, contents, batch_started)

    def release_after_a_while() -> None:
        time.sleep(0.5)  # the pipeline must wait for batch 1 now: time to fetch more if it would
        downloaded_while_held.append(len(recorder.downloaded))
        held_back.set()

    def download(uids: list[int]) -> list[FetchedBody]:
        found = recorder.download(uids)
        if len(recorder.downloaded) == BATCHES_IN_FLIGHT + 1:
            threading.Thread(target=release_after_a_while).start()
        return found

    uids = range(1, 21)
    assert fetch_parse_store(uids, sizes(uids), CONFIG, download, store)
    assert downloaded_while_held == [BATCHES_IN_FLIGHT + 1]
    assert recorder.stored == [[uid, uid + 1] for uid in range(1, 21, 2)]


def test_a_passed_deadline_stops_after_the_batch_that_passed_it() -> None:
    recorder = Recorder()
    uids = range(1, 8)
    passed = time.monotonic() - 1
    assert not fetch_parse_store(uids, sizes(uids), CONFIG, recorder.download, recorder.store, passed)
    assert recorder.stored == [[1, 2]]
    # The last batch completes the run, deadline or not.
    assert fetch_parse_store(range(7, 8), sizes(uids), CONFIG, recorder.download, recorder.store, passed)
    assert recorder.stored == [[1, 2], [7]]
