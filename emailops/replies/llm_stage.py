"""The after-index stage that asks the model for replies: one call in flight per worker.

``run_once`` never waits for the model. It finishes a call that has returned (in one transaction:
the reply composed and recorded in the outbox, the job marked done), then, with the hourly budget
not spent, claims the next due job and starts its call on a thread of its own. The worker's loop
goes on meanwhile (indexing, template replies, heartbeats), so a slow model never stalls it; the
call itself is bounded by ``LlmConfig.timeout_seconds``.

The thread only talks HTTP; every database write happens here, on the worker's thread. A worker
that dies mid-call leaves its job claimed: another takes it once the claim expires (at once when
the dead worker was of this supervisor's run), and the outbox's unique key keeps it to one reply.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import structlog
from sqlalchemy import Connection, Engine
from tenacity import wait_exponential

from emailops import metrics
from emailops.backoff import delay_seconds
from emailops.clock import Clock, utc_now
from emailops.config import LlmConfig, ReplyConfig
from emailops.llm import jobs
from emailops.llm.client import ChatClient, ChatRequest, Completion, LlmError
from emailops.llm.prompt import EmptyReplyError, chat_messages, reply_text
from emailops.processes import is_dead_sibling
from emailops.replies import outbox
from emailops.replies.compose import AddressError, build_reply
from emailops.replies.due_work import DueWork
from emailops.store import messages as message_store
from emailops.store.database import reading

log = structlog.get_logger(component="llm")

# How often an idle stage looks for due jobs, and how often "budget spent" is logged.
POLL_SECONDS = 1.0
BUDGET_LOG_SECONDS = 300.0


class _Call:
    """One model call on a daemon thread (a stuck call never holds up the process's exit)."""

    def __init__(self, job: jobs.LlmJob, client: ChatClient) -> None:
        self.job = job
        self.started = time.monotonic()
        self.finished = threading.Event()
        self.completion: Completion | None = None
        self.error: LlmError | None = None
        self.latency = 0.0
        request = ChatRequest(
            model=job.model,
            messages=chat_messages(job.prompt),
            max_tokens=job.max_tokens,
            temperature=job.temperature,
        )
        self._thread = threading.Thread(
            target=self._run, args=(client, request), name=f"llm-job-{job.id}", daemon=True
        )
        self._thread.start()

    def _run(self, client: ChatClient, request: ChatRequest) -> None:
        try:
            self.completion = client.complete(request)
        except LlmError as exc:
            self.error = exc
        except Exception as exc:  # a bug in the client must not lose the job: it is retried
            self.error = LlmError(f"{type(exc).__name__}: {exc}", retryable=True)
        finally:
            self.latency = time.monotonic() - self.started
            self.finished.set()


class LlmStage:
    def __init__(
        self,
        engine: Engine,
        *,
        account: str,
        claimer: str,
        config: ReplyConfig,
        client: ChatClient,
        dead_runs: tuple[str, ...] = (),
        clock: Clock = utc_now,
        due: DueWork | None = None,
    ) -> None:
        """``due``: the worker's look at which accounts have work (None: this stage looks for its
        account's jobs at every poll)."""
        assert config.llm is not None, "the model stage needs LlmConfig"
        self.engine = engine
        self.account = account
        self.claimer = claimer
        self.config = config
        self.llm: LlmConfig = config.llm
        self.client = client
        self.dead_runs = dead_runs
        self.clock = clock
        self.due = due
        self.claim_timeout = timedelta(seconds=self.llm.claim_timeout_seconds)
        self.call: _Call | None = None
        self.next_poll = 0.0
        self.next_budget_log = 0.0

    def run_once(self) -> bool:
        worked = False
        if self.call is not None and self.call.finished.is_set():
            call, self.call = self.call, None
            self._finish(call)
            worked = True
            if self.due is not None:
                self.due.changed()  # the reply it wrote is due for the outbox
        if self.call is None and time.monotonic() >= self.next_poll and self._maybe_due():
            self.call = self._start_next()
            if self.call is None:
                self.next_poll = time.monotonic() + POLL_SECONDS
            worked = worked or self.call is not None
        return worked

    def close(self) -> None:
        """A call still running is given back: the job is pending again at once (the attempt counts)."""
        call, self.call = self.call, None
        if call is None:
            return
        if call.finished.is_set():
            self._finish(call)
            return
        with self.engine.begin() as conn:
            jobs.mark_retry(
                conn,
                call.job,
                reason="the worker stopped during the call",
                delay=timedelta(0),
                max_attempts=self.llm.max_attempts + 1,
            )

    # -- claiming ------------------------------------------------------------------------------

    def _maybe_due(self) -> bool:
        return self.due is None or self.due.llm_due(self.account)

    def _start_next(self) -> _Call | None:
        with reading(self.engine) as conn:
            idle = not jobs.has_due(conn, account=self.account, claim_timeout=self.claim_timeout)
            if idle and not self._dead_claimers(conn):
                return None
        with self.engine.begin() as conn:
            jobs.lock_budget(conn, account=self.account)
            dead = self._dead_claimers(conn)
            given_up = jobs.give_up_stale(
                conn,
                account=self.account,
                claim_timeout=self.claim_timeout,
                dead_claimers=dead,
                max_attempts=self.llm.max_attempts,
            )
            used = jobs.calls_in_last_hour(conn, account=self.account)
            job = None
            if used < self.llm.max_requests_per_hour:
                job = jobs.claim_next(
                    conn,
                    account=self.account,
                    claimer=self.claimer,
                    claim_timeout=self.claim_timeout,
                    dead_claimers=dead,
                )
        if given_up:
            log.error("model replies failed: their worker died or hung during every call", count=given_up)
        if used >= self.llm.max_requests_per_hour:
            if time.monotonic() >= self.next_budget_log:
                self.next_budget_log = time.monotonic() + BUDGET_LOG_SECONDS
                log.warning(
                    "model call budget spent: replies wait for the next hour",
                    calls_last_hour=used,
                    budget=self.llm.max_requests_per_hour,
                )
            return None
        if job is None:
            return None
        log.debug("model call started", llm_job_id=job.id, attempt=job.attempts, model=job.model)
        return _Call(job, self.client)

    def _dead_claimers(self, conn: Connection) -> tuple[str, ...]:
        claimers = jobs.working_claimers(conn, account=self.account)
        return tuple(
            c for c in claimers if c != self.claimer and is_dead_sibling(self.claimer, c, self.dead_runs)
        )

    # -- finishing -----------------------------------------------------------------------------

    def _finish(self, call: _Call) -> None:
        job = call.job
        fields = {
            "llm_job_id": job.id,
            "rule": job.rule_name,
            "model": job.model,
            "attempt": job.attempts,
            "latency_ms": round(call.latency * 1000),
        }
        if call.error is not None:
            self._failed(job, call.error, fields, call.latency)
            return
        assert call.completion is not None
        completion = call.completion
        fields |= {
            "tokens_in": completion.tokens_in,
            "tokens_out": completion.tokens_out,
            "finish_reason": completion.finish_reason,
        }
        try:
            text = reply_text(completion.text)
        except EmptyReplyError as exc:
            self._failed(job, LlmError(str(exc), retryable=True), fields, call.latency)
            return
        with self.engine.begin() as conn:
            if not jobs.still_claimed(conn, job):
                outcome, outbox_id, reason = "claim_lost", None, None
            else:
                outcome, outbox_id, reason = self._record_reply(conn, job, text)
        metrics.llm_call(job.rule_name, outcome, call.latency, completion.tokens_in, completion.tokens_out)
        if outcome == "ok":
            log.info("model call", outcome="ok", outbox_id=outbox_id, reply_action=job.action, **fields)
        elif outcome == "claim_lost":
            log.warning("model call", outcome="claim_lost", **fields)
        else:
            log.error("model call", outcome="failed", reason=reason, **fields)

    def _record_reply(
        self, db: Connection, job: jobs.LlmJob, text: str
    ) -> tuple[str, int | None, str | None]:
        """Compose the reply from the stored message (recipient, subject, threading from the inbound
        headers; only the text from the model), record it in the outbox, mark the job done."""
        stored = message_store.load_message(db, job.message_pk) if job.message_pk is not None else None
        reason = None
        if stored is None:
            reason = "the inbound message is no longer in the index"
        else:
            try:
                composed = build_reply(
                    stored.parsed,
                    from_address=self.config.from_address,
                    inbound_key=job.inbound_key,
                    rule_name=job.rule_name,
                    body_text=text,
                    subject=job.subject,
                    now=self.clock(),
                )
            except AddressError as exc:
                reason = f"no valid address ({exc})"
            else:
                if composed.recipient != job.recipient:
                    reason = "the inbound message's reply address changed since the decision"
        if reason is not None:
            jobs.mark_failed(db, job, reason=reason)
            return "failed", None, reason
        outbox_id, _created = outbox.insert_reply(
            db,
            account=job.account,
            inbound_key=job.inbound_key,
            message_pk=job.message_pk,
            rule_name=job.rule_name,
            action=job.action,
            recipient=job.recipient,
            reply_message_id=composed.message_id,
            subject=composed.subject,
            raw=composed.raw,
            now=self.clock(),
        )
        jobs.mark_done(db, job, outbox_id=outbox_id)
        return "ok", outbox_id, None

    def _failed(self, job: jobs.LlmJob, error: LlmError, fields: dict[str, object], latency: float) -> None:
        with self.engine.begin() as conn:
            if error.retryable:
                delay = self._retry_delay(job.attempts, error.retry_after)
                state = jobs.mark_retry(
                    conn, job, reason=error.reason, delay=delay, max_attempts=self.llm.max_attempts
                )
            else:
                jobs.mark_failed(conn, job, reason=error.reason)
                state = jobs.JobState.FAILED
        outcome = "retry" if state is jobs.JobState.PENDING else "failed"
        metrics.llm_call(job.rule_name, outcome, latency, None, None)
        if state is jobs.JobState.PENDING:
            log.warning(
                "model call",
                outcome="retry",
                error=error.reason,
                status=error.status or None,
                retry_in_seconds=round(delay.total_seconds(), 1),
                **fields,
            )
        else:
            log.error(
                "model call", outcome="failed", error=error.reason, status=error.status or None, **fields
            )

    def _retry_delay(self, attempts: int, retry_after: float | None) -> timedelta:
        """The server's Retry-After when it gave one (at most a day), else exponential backoff."""
        if retry_after is not None:
            return timedelta(seconds=min(retry_after, 86400.0))
        llm = self.llm
        strategy = wait_exponential(multiplier=llm.backoff_initial_seconds, max=llm.backoff_max_seconds)
        return timedelta(seconds=delay_seconds(strategy, attempts))
