"""The log of what each matching rule decided for a message (``rule_decisions``): written with
the decision, in its transaction; read by the rules' statistics and a message's story; deleted
``REPLY_HISTORY_DAYS`` after (``history``). Dry runs record nothing.

Outcomes: ``replied`` (a reply recorded in the outbox: sent, or saved as a draft with ``drafted``),
``model`` (a language model's job will write it), ``recorded_before`` (a run before this one
recorded it: nothing new), ``suppressed`` (why in ``reason``: a robot, a limit, no valid address,
no model), ``matched`` (a rule without a reply: mailbox actions only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, func, select

from emailops.replies.decisions import Decision
from emailops.store.dialect import locking
from emailops.store.schema import rule_decisions


@dataclass(frozen=True)
class RecordedDecision:
    rule: str
    outcome: str
    reason: str | None
    outbox_id: int | None
    llm_job_id: int | None
    decided_at: datetime


@dataclass(frozen=True)
class RuleStats:
    """A rule's matches over the last days, and its last match (None: none in the log)."""

    rule: str
    matches: int
    last_match: datetime | None


def outcome(decision: Decision) -> str:
    if decision.suppressed is not None:
        return "suppressed"
    if decision.reply_action is None:
        return "matched"
    if not decision.created:
        return "recorded_before"
    if decision.llm_job_id is not None:
        return "model"
    return "drafted" if decision.reply_action == "draft" else "replied"


def record(
    conn: Connection, *, account: str, message_pk: int, made: Sequence[Decision], now: datetime
) -> None:
    """Log ``made`` for message ``message_pk`` in the decision's transaction (dry runs: nothing)."""
    rows = [
        {
            "account": account,
            "message_pk": message_pk,
            "rule_name": d.rule,
            "outcome": outcome(d),
            "reason": d.suppressed,
            "outbox_id": d.outbox_id,
            "llm_job_id": d.llm_job_id,
            "decided_at": now,
        }
        for d in made
        if not d.dry_run
    ]
    if rows:
        conn.execute(rule_decisions.insert(), rows)


def for_message(conn: Connection, message_pk: int) -> list[RecordedDecision]:
    """What the rules decided for a message, in the order decided (each run of its rules)."""
    c = rule_decisions.c
    query = (
        select(c.rule_name, c.outcome, c.reason, c.outbox_id, c.llm_job_id, c.decided_at)
        .where(c.message_pk == message_pk)
        .order_by(c.id)
    )
    return [RecordedDecision(*row) for row in conn.execute(query)]


def rules_stats(
    conn: Connection, account: str, rule_names: Sequence[str], *, now: datetime, days: int = 7
) -> list[RuleStats]:
    """For each of ``rule_names`` (in that order): its matches in the ``days`` before ``now``, and its
    last match in the log (kept REPLY_HISTORY_DAYS)."""
    c = rule_decisions.c
    since = now - timedelta(days=days)
    query = (
        select(c.rule_name, func.count().filter(c.decided_at >= since), func.max(c.decided_at))
        .where(c.account == account, c.rule_name.in_(tuple(rule_names)))
        .group_by(c.rule_name)
    )
    found = {name: RuleStats(name, int(count), last) for name, count, last in conn.execute(query)}
    return [found.get(name, RuleStats(name, 0, None)) for name in rule_names]


def purge_batch(conn: Connection, *, older_than: datetime, limit: int) -> int:
    """Delete at most ``limit`` decisions made before ``older_than``, oldest first; how many."""
    c = rule_decisions.c
    oldest = locking(
        conn,
        select(c.id).where(c.decided_at < older_than).order_by(c.decided_at).limit(limit),
        skip_locked=True,
    )
    batch = list(conn.execute(oldest).scalars())
    if not batch:
        return 0
    return int(conn.execute(delete(rule_decisions).where(c.id.in_(batch))).rowcount)
