"""The mailbox changes of one account that a stage put off because no IMAP connection slot was free.

Each account's mailbox session takes one of the account's slots (IMAP_MAX_CONNECTIONS) when used,
and none may be free: the watchers and other workers' sessions hold them. A rule's flags and move,
or a reply's Sent copy, is then recorded (``store.mailbox_changes``) and made again after a
backoff, by this or another worker, also after a restart. The stage asks for due changes when the
first of its own is due, at its start (those of earlier runs), and every ``CHECK_SECONDS`` (those
of others): one query then, not one per loop iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Literal

from sqlalchemy import Engine
from tenacity import wait_exponential

from emailops.backoff import delay_seconds
from emailops.replies.due_work import DueWork
from emailops.store import mailbox_changes
from emailops.store.mailbox_changes import PutOff

# 5 s, 10, 20, ... at most 5 minutes: a slot comes free within seconds once a worker's session has
# been unused for ``MailboxSession.IDLE_CLOSE_SECONDS``.
BACKOFF = wait_exponential(multiplier=5, min=5, max=300)
# A change taken by a worker is held this long (it takes a few IMAP round trips), then due again.
HOLD = timedelta(minutes=2)
# How often a worker looks for changes it did not put off (a worker that died or let the account
# go left them; each worker looks at its start, and makes its own when due): with hundreds of
# accounts per worker, more often would cost as much as the stages' other scans (bench/README.md,
# "Many mailboxes at scale", finding 2).
CHECK_SECONDS = 300.0
TAKE_AT_ONCE = 20


def first_delay() -> timedelta:
    """The wait before a change put off is tried again the first time."""
    return timedelta(seconds=delay_seconds(BACKOFF, 1))


class PutOffChanges:
    def __init__(
        self,
        engine: Engine,
        account: str,
        of: Literal["message", "sent_copy"],
        *,
        due: DueWork | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """With ``due`` (a worker's), the changes are looked for when it says the account has one
        due; without, by the times below."""
        self.engine = engine
        self.account = account
        self.of = of
        self.due = due
        self.monotonic = monotonic
        self.next_check = 0.0  # at once: changes left by an earlier run
        # When each change this worker put off is due (``monotonic``), a moment after its
        # ``due_at`` (the database's clock).
        self._own_due: list[float] = []

    def put_off(
        self,
        *,
        message_pk: int | None = None,
        actions: list[tuple[str, str | None]] | None = None,
        replied: bool = False,
        outbox_id: int | None = None,
    ) -> None:
        delay = first_delay()
        with self.engine.begin() as conn:
            mailbox_changes.put_off(
                conn,
                account=self.account,
                delay=delay,
                message_pk=message_pk,
                actions=actions,
                replied=replied,
                outbox_id=outbox_id,
            )
        self._check_within(delay.total_seconds())

    def take_due(self) -> list[PutOff]:
        """The changes due now (held for this worker), when it is time to look."""
        now = self.monotonic()
        if self.due is not None:
            if not self.due.put_off_due(self.account):
                return []
        elif now < self.next_check:
            return []
        with self.engine.begin() as conn:
            due = mailbox_changes.take_due(conn, self.account, self.of, hold=HOLD, limit=TAKE_AT_ONCE)
        self._own_due = [moment for moment in self._own_due if moment > now]
        # More may be due when the limit was reached: look again at the next call.
        self.next_check = now if len(due) == TAKE_AT_ONCE else min([now + CHECK_SECONDS, *self._own_due])
        return due

    def again(self, change: PutOff) -> None:
        """Still no slot free: tried again after a longer wait."""
        delay = delay_seconds(BACKOFF, change.attempts + 1)
        with self.engine.begin() as conn:
            mailbox_changes.put_off_again(conn, change.id, timedelta(seconds=delay))
        self._check_within(delay)

    def done(self, change: PutOff) -> None:
        with self.engine.begin() as conn:
            mailbox_changes.done(conn, change.id)

    def _check_within(self, seconds: float) -> None:
        due = self.monotonic() + seconds + 1.0
        self._own_due.append(due)
        self.next_check = min(self.next_check, due)
