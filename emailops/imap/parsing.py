"""Parsing fetched messages, in this process or, for a large catch-up, in helper processes.

An initial sync is three kinds of work for each batch: download, parse, store. Parsing is the
largest and needs nothing from the other two, so for many messages it runs in spawned helper
processes while this process downloads the next batches and stores the previous ones. Small
batches (new mail while watching) are parsed here: starting a process would cost more than it
saves. This module imports only the parser (no SQLAlchemy), so helpers start quickly.
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
# One: a second helper cost more CPU (another interpreter) than it won back on two cores.
HELPER_PROCESSES = 1


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
    """What the index stores of each (raw, size) (``parse_message`` never raises)."""
    return [message_content(parse_one(raw, size, max_message_bytes, max_body_chars)) for raw, size in raws]


Parsed = list[MessageContent]


def exit_with_parent(parent_pid: int) -> None:
    """In the helper: exit as soon as the process that started it is gone (kill -9 included);
    an orphaned helper would otherwise wait on its task queue for ever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _ready() -> None:
    """A no-op job: submitting it makes the pool start a helper now."""


class ParseHelpers:
    """The helper processes that parse for large passes.

    Started on demand by a pass, or ahead of it by a command that is about to catch up
    (``emailops sync --once``, ``reindex``): each helper is a fresh interpreter that needs a few
    tenths of a second to import the parser, which then overlaps with the command's own start-up
    instead of delaying the first batch.
    """

    def __init__(self, workers: int = HELPER_PROCESSES) -> None:
        self.workers = workers
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=exit_with_parent,
            initargs=(os.getpid(),),
        )
        for _ in range(workers):
            self.pool.submit(_ready)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ParseHelpers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Parser:
    """``submit(raws)`` returns a future of the parsed messages, computed here or by helpers.

    ``helpers`` are used when given (and left running); ``use_helper`` starts helpers for this
    parser alone (stopped by ``close``).
    """

    def __init__(
        self,
        *,
        max_message_bytes: int,
        max_body_chars: int,
        use_helper: bool,
        helpers: ParseHelpers | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_body_chars = max_body_chars
        self._own_helpers = ParseHelpers() if use_helper and helpers is None else None
        chosen = helpers if use_helper and helpers is not None else self._own_helpers
        self._pool = chosen.pool if chosen is not None else None
        self._workers = chosen.workers if chosen is not None else 0
        self._inflight: list[Future[Parsed]] = []

    def submit(self, raws: Sequence[tuple[bytes, int]]) -> Future[Parsed]:
        """Parse (raw, size) pairs: by the helpers, unless they already have a batch waiting
        besides the ones they parse; then here, since this thread would only wait for them."""
        self._inflight = [job for job in self._inflight if not job.done()]
        if self._pool is not None and len(self._inflight) <= self._workers:
            job = self._pool.submit(parse_all, list(raws), self.max_message_bytes, self.max_body_chars)
            self._inflight.append(job)
            return job
        done: Future[Parsed] = Future()
        done.set_result(parse_all(raws, self.max_message_bytes, self.max_body_chars))
        return done

    def close(self) -> None:
        if self._own_helpers is not None:
            self._own_helpers.close()
            self._own_helpers = None
        self._pool = None

    def __enter__(self) -> Parser:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
