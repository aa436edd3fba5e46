"""The reply history stays bounded: what a reply or a model's job carries is kept for
``REPLY_HISTORY_DAYS``, then emptied; the row itself stays.

Emptied: the outbox's ``raw`` (the reply as sent, a model's answer included) and ``llm_jobs.prompt``
(the message's text as sent to the model). Kept: everything else of the row, above all its unique
key (account, inbound message, rule), which is what keeps a message from being answered twice, and
its recipient, action, state and time, which the reply limits count. Only rows that are finished
(a reply sent, failed, unknown or cancelled; a job done, failed or cancelled) are emptied; a purged
row is never sent or asked again (``retry`` refuses it). ``purged_at`` says when. The log of the
rules' decisions (``decision_log``) older than that is deleted.

Every worker purges once a day (``HistoryPurgeStage``), in batches of one short transaction each,
so no purge holds the write lock long; workers purging at once share the rows out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Connection, Engine, Table, select, update

from emailops.clock import Clock, utc_now
from emailops.llm.jobs import JobState
from emailops.replies import decision_log
from emailops.replies.outbox import OutboxState
from emailops.store.dialect import locking
from emailops.store.schema import llm_jobs, outbox

log = structlog.get_logger(component="rules")

PURGE_INTERVAL_SECONDS = 24 * 3600.0
PURGE_BATCH = 500

# Each table, the column emptied, and the states of rows not finished (kept whole). Written as
# "state NOT IN" so that no planner prefers the state index to the purge's own.
_PURGED: tuple[tuple[Table, str, object, tuple[str, ...]], ...] = (
    (outbox, "raw", b"", (OutboxState.PENDING, OutboxState.SENDING)),
    (llm_jobs, "prompt", "", (JobState.PENDING, JobState.WORKING)),
)


def purge_batch(conn: Connection, *, older_than: datetime, now: datetime, limit: int = PURGE_BATCH) -> int:
    """Empty the contents of at most ``limit`` finished rows of each table created before
    ``older_than``, oldest first, and delete as many decisions logged before it; returns how many
    rows were emptied or deleted (0: nothing left to purge)."""
    emptied = 0
    for table, column, blank, unfinished in _PURGED:
        ids = select(table.c.id).where(
            table.c.purged_at.is_(None),
            table.c.created_at < older_than,
            table.c.state.not_in(unfinished),
        )
        # Workers purging at once take different rows (PostgreSQL; SQLite has one writer).
        oldest = locking(conn, ids.order_by(table.c.created_at).limit(limit), skip_locked=True)
        batch = list(conn.execute(oldest).scalars())
        if batch:
            emptied += conn.execute(
                update(table)
                .where(table.c.id.in_(batch), table.c.purged_at.is_(None))
                .values({column: blank, "purged_at": now})
            ).rowcount
    return emptied + decision_log.purge_batch(conn, older_than=older_than, limit=limit)


class HistoryPurgeStage:
    """An after-index stage of every worker: once a day, purge the history in batches; each
    ``run_once`` does at most ``budget_seconds`` of batches, so the worker's loop goes on."""

    def __init__(
        self,
        engine: Engine,
        *,
        history_days: int,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        batch: int = PURGE_BATCH,
        budget_seconds: float = 1.0,
    ) -> None:
        self.engine = engine
        self.history = timedelta(days=history_days)
        self.clock = clock
        self.monotonic = monotonic
        self.batch = batch
        self.budget_seconds = budget_seconds
        self.next_purge = monotonic()  # the first at start: a daemon restarted daily still purges
        self.purged = 0

    def run_once(self) -> bool:
        started = self.monotonic()
        if started < self.next_purge:
            return False
        while self.monotonic() - started < self.budget_seconds:
            now = self.clock()
            with self.engine.begin() as conn:
                emptied = purge_batch(conn, older_than=now - self.history, now=now, limit=self.batch)
            if not emptied:
                self._finished()
                return False
            self.purged += emptied
        return True  # maybe more to purge: the next call goes on

    def _finished(self) -> None:
        if self.purged:
            log.info("reply history purged", rows=self.purged, older_than_days=self.history.days)
        self.purged = 0
        self.next_purge = self.monotonic() + PURGE_INTERVAL_SECONDS

    def close(self) -> None:
        pass
