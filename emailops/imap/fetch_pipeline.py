"""Fetch, parse and store a run of UIDs in batches, the three stages at once.

This thread downloads batch k+2 while the parser (``emailops.imap.parsing``: a helper process for a
large catch-up) parses batch k+1 and the store thread writes batch k (SQLite's own work, the
full-text index above all, runs there without the GIL). The stages are given as two callables, so
this module knows neither IMAP nor the database. What it guarantees:

- batches are stored one at a time, in the order of the UIDs;
- after a failed store no later batch is stored: its progress mark would claim the failed batch;
- at most ``BATCHES_IN_FLIGHT`` batches are held, so memory stays bounded;
- with a deadline, the run stops after the batch that passes it, that batch stored (and holds one
  batch in flight, not ``BATCHES_IN_FLIGHT``, so that it ends soon after the deadline).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from emailops.config import SyncConfig
from emailops.imap.bulk_fetch import FetchedBody
from emailops.imap.parsing import HELPER_THRESHOLD, Parsed, Parser

# Batches downloaded but not yet stored, at most (each is bounded by SyncConfig's batch limits).
BATCHES_IN_FLIGHT = 3

# The raw messages of a batch of UIDs (those the server still holds).
Download = Callable[[list[int]], list[FetchedBody]]
# Stores a batch: its bodies, what the parser made of them (in the same order), and when its
# download began.
Store = Callable[[list[FetchedBody], Parsed, float], None]


def batches(uids: Sequence[int], sizes: Mapping[int, int], config: SyncConfig) -> Iterator[list[int]]:
    """``uids`` in runs bounded by ``fetch_batch_messages`` and ``fetch_batch_bytes``; an oversized
    message counts for the ``max_message_bytes`` fetched of it at most."""
    batch: list[int] = []
    batch_bytes = 0
    for uid in uids:
        size = min(sizes.get(uid, 0), config.max_message_bytes)
        if batch and (
            len(batch) >= config.fetch_batch_messages or batch_bytes + size > config.fetch_batch_bytes
        ):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(uid)
        batch_bytes += size
    if batch:
        yield batch


class _StoreInOrder:
    """The store stage, run by one thread, batch after batch: once a store failed, it stores no
    later batch."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._failed = threading.Event()

    def __call__(self, bodies: list[FetchedBody], job: Future[Parsed], batch_started: float) -> None:
        if self._failed.is_set():
            raise RuntimeError("an earlier batch failed to store")
        try:
            self._store(bodies, job.result(), batch_started)
        except BaseException:
            self._failed.set()
            raise


def fetch_parse_store(
    uids: Sequence[int],
    sizes: Mapping[int, int],
    config: SyncConfig,
    download: Download,
    store: Store,
    deadline: float | None = None,
) -> bool:
    """Download, parse and store ``uids`` (ascending) in batches; False when stopped by the
    ``deadline`` (``time.monotonic()``). ``sizes`` holds each UID's RFC822.SIZE. The first error of
    a stage is raised once the batches before it are stored."""
    # A run with a deadline is one short pass of a worker's loop, whose helper would be started
    # again in every pass: parsing stays here.
    parser = Parser(
        max_message_bytes=config.max_message_bytes,
        max_body_chars=config.max_body_chars,
        use_helper=deadline is None and len(uids) >= HELPER_THRESHOLD,
    )
    store_in_order = _StoreInOrder(store)
    # With a deadline, the batches under way when it passes are few: the run ends soon after it.
    most_in_flight = 1 if deadline is not None else BATCHES_IN_FLIGHT
    with parser, ThreadPoolExecutor(max_workers=1, thread_name_prefix="store") as store_thread:
        in_flight: deque[Future[None]] = deque()
        complete = True
        for batch in batches(uids, sizes, config):
            batch_started = time.monotonic()
            bodies = download(batch)
            job = parser.submit([(body.raw, sizes.get(body.uid, 0)) for body in bodies])
            in_flight.append(store_thread.submit(store_in_order, bodies, job, batch_started))
            while in_flight and (in_flight[0].done() or len(in_flight) > most_in_flight):
                in_flight.popleft().result()
            if deadline is not None and time.monotonic() > deadline and batch[-1] != uids[-1]:
                complete = False
                break
        while in_flight:
            in_flight.popleft().result()
    return complete
