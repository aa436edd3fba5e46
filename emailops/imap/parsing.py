"""Parsing fetched messages, in this process or, for a large catch-up, in a helper process.

An initial sync is three kinds of work for each batch: download, parse, store. Parsing is the
largest and needs nothing from the other two, so for many messages it runs in a helper process
(forked, or spawned where forking is unsafe: ``helper_start_method``) while this process
downloads the next batches and stores the previous ones (and parses a batch itself when the
helper is behind). Small batches (new mail while watching) are parsed here: starting a process
would cost more than it saves. This module imports only the parser (no SQLAlchemy), so a spawned
helper starts as quickly as it can.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from types import TracebackType

from emailops.mime.model import ParsedMessage
from emailops.mime.parse import parse_message
from emailops.store.content import MessageContent, message_content

# Below this many messages in a pass, parsing stays in this process.
HELPER_THRESHOLD = 300
# Batches the helper may have on hand (the one it parses and one waiting) before this process
# parses the next itself rather than wait for it.
HELPER_BATCHES_ON_HAND = 2


def parse_one(raw: bytes, size: int, max_message_bytes: int, max_body_chars: int) -> ParsedMessage:
    """Parse one message; ``size`` is the server's RFC822.SIZE, which tells an oversized message
    (fetched as its header and the beginning of its text) from a whole one."""
    parsed = parse_message(raw, max_message_bytes=max_message_bytes, max_body_chars=max_body_chars)
    if size <= max_message_bytes:
        return parsed
    return replace(
        parsed, size=size, truncated=True, problems=(*parsed.problems, f"message-truncated:{size}")
    )


def parse_all(
    raws: Sequence[tuple[bytes, int]], max_message_bytes: int, max_body_chars: int
) -> list[MessageContent]:
    """What the index stores of each (raw, size), with its parse time (``parse_message`` never raises)."""
    contents = []
    for raw, size in raws:
        started = time.perf_counter()
        content = message_content(parse_one(raw, size, max_message_bytes, max_body_chars))
        contents.append(content._replace(parse_seconds=time.perf_counter() - started))
    return contents


Parsed = list[MessageContent]


def exit_with_parent(parent_pid: int) -> None:
    """In the helper: exit as soon as the process that started it is gone (kill -9 included);
    an orphaned helper would otherwise wait on its task queue for ever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def helper_start_method() -> str:
    """``fork`` when this thread is the process's only one, else ``spawn``.

    A forked helper is ready at once, with the parser already imported: a spawned one spends a
    few tenths of a second of CPU starting an interpreter, on a machine whose cores the download
    and the store need. Forking is only safe without other threads (a lock one of them holds
    would stay held in the child for ever), so a daemon worker, which watches its parent from a
    thread, spawns; ``sync --once`` and ``reindex`` fork.
    """
    return "fork" if threading.active_count() == 1 else "spawn"


def _ready() -> None:
    """A no-op job: submitting it makes the pool start the helper now."""


class Parser:
    """``submit(raws)`` returns a future of the parsed messages, computed here or by the helper.

    With ``use_helper`` one helper process is started at once, so that a spawned one's start (a
    few tenths of a second to import the parser) overlaps with the download of the first batch.
    One, because a second won nothing measurable on two cores, forked or spawned (a spawned one
    also costs another interpreter's start). ``close`` stops it.
    """

    def __init__(self, *, max_message_bytes: int, max_body_chars: int, use_helper: bool) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_body_chars = max_body_chars
        self._pool: ProcessPoolExecutor | None = None
        if use_helper:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context(helper_start_method()),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            )
            self._pool.submit(_ready)
        self._inflight: list[Future[Parsed]] = []

    def submit(self, raws: Sequence[tuple[bytes, int]]) -> Future[Parsed]:
        """Parse (raw, size) pairs: by the helper, unless it already has a batch waiting besides
        the one it parses; then here, since this thread would only wait for it."""
        self._inflight = [job for job in self._inflight if not job.done()]
        if self._pool is not None and len(self._inflight) < HELPER_BATCHES_ON_HAND:
            job = self._pool.submit(parse_all, list(raws), self.max_message_bytes, self.max_body_chars)
            self._inflight.append(job)
            return job
        done: Future[Parsed] = Future()
        done.set_result(parse_all(raws, self.max_message_bytes, self.max_body_chars))
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Parser:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
