"""Which of a worker's accounts have work due after indexing, asked once per loop iteration.

A worker runs the rules, model and outbox stages of every account it serves, every iteration of
its loop (about a second). Each stage looking for its own work costs a query per account and
iteration, idle or not (200 accounts: 0.9 cores and 1,200 transactions/s idle, bench/README.md
"Many mailboxes at scale"). ``DueWork``, shared by the stages of one worker, asks the database
instead, in one short read transaction of four indexed queries, which accounts have rules
pending, replies due, model jobs due or being worked on, and mailbox changes put off and due; a
stage of an account with none returns at once, without a query, and one with some looks for its
work as it always did. It asks through the database, not only what this process did: work
recorded by another worker or container is seen in the next iteration.

``DueWork`` is the worker's first after-index stage: its ``run_once`` starts an iteration, and
the first question of the iteration asks the database. A stage that did work calls ``changed()``:
what it recorded (a reply queued by the rules, a model's reply written) is due for the stages
after it in the same iteration, as when each asked for itself.

Once per worker, for every account, it also takes back the claims of workers that hung or died
(``recovery``) and counts the outbox for the metrics; stages given a ``DueWork`` do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Engine

from emailops import metrics
from emailops.clock import Clock, utc_now
from emailops.config import ReplyConfig
from emailops.llm import jobs
from emailops.replies import outbox, recovery
from emailops.store import mailbox_changes
from emailops.store import messages as message_store
from emailops.store.database import reading


class DueWork:
    def __init__(
        self,
        engine: Engine,
        *,
        config: ReplyConfig,
        claimer: str,
        dead_runs: tuple[str, ...] = (),
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``config``: the claim timeouts and attempts shared by every account (the deployment's)."""
        self.engine = engine
        self.config = config
        self.claimer = claimer
        self.dead_runs = dead_runs
        self.clock = clock
        self.monotonic = monotonic
        self.stale = True
        self.rules_accounts: set[str] = set()
        self.outbox_accounts: set[str] = set()
        self.llm_accounts: set[str] = set()
        self.put_off_accounts: set[str] = set()
        self.next_stall_check = 0.0
        self.next_sends_check = 0.0
        self.next_count = 0.0

    def run_once(self) -> bool:
        """A new iteration: due work is asked again at the next question; claims are recovered
        when it is time (before any stage looks, so what they make due is seen now)."""
        self.stale = True
        now = self.monotonic()
        if now >= self.next_stall_check:
            recovery.recover_stalled_rules(
                self.engine, self.config, claimer=self.claimer, dead_runs=self.dead_runs
            )
            self.next_stall_check = now + recovery.stall_check_seconds(self.config)
        if now >= self.next_sends_check:
            recovery.recover_interrupted_sends(
                self.engine, claimer=self.claimer, dead_runs=self.dead_runs, now=self.clock()
            )
            self.next_sends_check = now + recovery.SENDS_CHECK_SECONDS
        if metrics.enabled() and now >= self.next_count:
            recovery.count_outbox(self.engine)
            self.next_count = now + recovery.OUTBOX_COUNT_SECONDS
        return False

    def changed(self) -> None:
        """A stage recorded work: the next question asks the database again."""
        self.stale = True

    def rules_due(self, account: str) -> bool:
        """Messages of ``account`` wait for their rules (``messages.pending_for_rules``)."""
        return account in self._fresh().rules_accounts

    def outbox_due(self, account: str) -> bool:
        """A reply or draft of ``account`` is due now (``outbox.due_actions``)."""
        return account in self._fresh().outbox_accounts

    def llm_due(self, account: str) -> bool:
        """A model job of ``account`` is due, or claimed: the stage tells whether the claim is
        stale or its worker gone (``LlmStage``)."""
        return account in self._fresh().llm_accounts

    def put_off_due(self, account: str) -> bool:
        """A mailbox change of ``account`` that found no IMAP connection slot is due again
        (``store.mailbox_changes``)."""
        return account in self._fresh().put_off_accounts

    def close(self) -> None:
        """Nothing of its own."""

    def _fresh(self) -> DueWork:
        if self.stale:
            with reading(self.engine) as conn:
                self.rules_accounts = message_store.accounts_pending_for_rules(conn)
                self.outbox_accounts = outbox.due_accounts(conn, now=self.clock())
                self.llm_accounts = jobs.accounts_maybe_due(conn)
                self.put_off_accounts = mailbox_changes.accounts_due(conn)
            self.stale = False
        return self
