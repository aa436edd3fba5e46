"""Claims of workers that hung or died, taken back, and the outbox counted for the metrics.

A worker runs these every minute or so: ``DueWork`` once for all the accounts it serves, a stage
used on its own for its account. Which claims are stale is decided by the database's clock (the
claim timeouts) or, at once, by the claimer being a process known to be gone
(``processes.is_dead_sibling``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from sqlalchemy import Engine

from emailops import metrics
from emailops.config import ReplyConfig
from emailops.processes import is_dead_sibling
from emailops.replies import outbox
from emailops.replies.outbox import OutboxState
from emailops.store import rules_work
from emailops.store.database import reading
from emailops.store.quarantine import QuarantinedMessage

log = structlog.get_logger(component="rules")

# A claim older than this is from a process that died while sending (a send never lasts this long).
STALE_CLAIM = timedelta(minutes=10)
# How often the outbox is counted by state for the metrics (one GROUP BY on an indexed column).
OUTBOX_COUNT_SECONDS = 15.0
# How often replies interrupted while sending are looked for.
SENDS_CHECK_SECONDS = 60.0


def stall_check_seconds(config: ReplyConfig) -> float:
    """How often stalled rules claims are looked for: well within their claim timeout."""
    return min(60.0, config.rules_claim_timeout_seconds / 2)


def recover_stalled_rules(
    engine: Engine,
    config: ReplyConfig,
    *,
    claimer: str | None,
    dead_runs: tuple[str, ...] = (),
    account: str | None = None,
) -> None:
    """Rules claims of workers that hung or died on a message, of ``account`` (None: of every
    account): tried again, or quarantined. Without ``claimer`` only the claim timeout tells."""
    with engine.begin() as conn:
        claimers = rules_work.working_claimers(conn, account) if claimer else []
        dead = tuple(c for c in claimers if is_dead_sibling(claimer or "", c, dead_runs))
        retried, quarantined = rules_work.recover_stalled(
            conn,
            account,
            claim_timeout=timedelta(seconds=config.rules_claim_timeout_seconds),
            max_attempts=config.rules_max_attempts,
            dead_claimers=dead,
        )
    if retried:
        log.warning("rules of messages whose worker hung or died are tried again", count=retried)
    for entry in quarantined:
        report_quarantined(entry)


def recover_interrupted_sends(
    engine: Engine, *, claimer: str, dead_runs: tuple[str, ...], now: datetime
) -> None:
    """Replies of every account left ``sending`` by a dead process become ``unknown`` (never resent
    blindly): at once for a claimer of this supervisor's run whose process is gone (see
    ``ProcessIdentity``), after ``STALE_CLAIM`` by the database's clock for others."""
    with engine.begin() as conn:
        claimers = outbox.sending_claimers(conn)
        dead = tuple(c for c in claimers if is_dead_sibling(claimer, c, dead_runs))
        unknown = outbox.recover_interrupted(conn, now=now, claimers=dead, claim_timeout=STALE_CLAIM)
    for rule in unknown:
        metrics.reply_outcome(rule, "unknown")


def count_outbox(engine: Engine, *, account: str | None = None) -> None:
    """Set the outbox gauge from the replies of ``account`` (None: of every account) by state."""
    with reading(engine) as conn:
        counts = outbox.count_by_state(conn, account=account)
    metrics.outbox_depth(counts, [state.value for state in OutboxState])


def report_quarantined(entry: QuarantinedMessage) -> None:
    metrics.message_quarantined("rules")
    log.error(
        "message quarantined: its rules keep failing; it will not be answered (emailops quarantine)",
        folder=entry.folder,
        uid=entry.uid,
        message_id=entry.message_id,
        attempts=entry.attempts,
        reason=entry.reason,
    )
