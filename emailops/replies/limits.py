"""Reply rate limits, counted from the outbox inside the caller's transaction.

- per rule and sender: a rule answers one address at most once per ``once_per_sender_days``
  (drafts count too: a draft is the rule's answer, held for a human);
- per sender per day, all rules: ``ReplyConfig.max_replies_per_sender_per_day`` (sends only);
- per hour for the account: ``ReplyConfig.max_replies_per_hour`` (sends only), the storm breaker.

Every outbox row except ``cancelled`` counts, whatever its delivery state: a failed reply was still
a decision to answer. So does a model's reply still being written (an open ``llm_jobs`` row; a done
one has its outbox row). Recipients are stored lower-cased, so the counts compare exactly.

Concurrency: SQLite serialises writers (``BEGIN IMMEDIATE``). On PostgreSQL ``lock_recipient``
takes a transaction-scoped advisory lock on (account, recipient) so that two workers cannot both
decide to answer the same address; the per-hour cap may overshoot by at most one reply per
concurrent worker.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from emailops.config import ReplyConfig
from emailops.llm.jobs import OPEN_STATES
from emailops.store.dialect import serialise_on
from emailops.store.schema import llm_jobs, outbox

_COUNTED = ((outbox, outbox.c.state != "cancelled"), (llm_jobs, llm_jobs.c.state.in_(OPEN_STATES)))


def lock_recipient(conn: Connection, *, account: str, recipient: str) -> None:
    """Serialise reply decisions for one recipient until the transaction ends (PostgreSQL only)."""
    serialise_on(conn, f"emailops.reply:{account}:{recipient}")


def _count(
    conn: Connection,
    *,
    account: str,
    since: datetime,
    rule_name: str | None = None,
    recipient: str | None = None,
    sends_only: bool = False,
) -> int:
    """Replies of the account created after ``since``: outbox rows and open model jobs."""
    total = 0
    for table, counted in _COUNTED:
        conditions = [counted, table.c.account == account, table.c.created_at > since]
        if rule_name is not None:
            conditions.append(table.c.rule_name == rule_name)
        if recipient is not None:
            conditions.append(table.c.recipient == recipient)
        if sends_only:
            conditions.append(table.c.action == "send")
        total += conn.execute(select(func.count()).select_from(table).where(*conditions)).scalar_one()
    return total


def limit_reason(
    conn: Connection,
    *,
    account: str,
    rule_name: str,
    recipient: str,
    once_per_sender_days: int,
    config: ReplyConfig,
    now: datetime,
) -> str | None:
    """Why a new reply to ``recipient`` by ``rule_name`` would exceed a limit, or ``None``."""
    recipient = recipient.lower()
    if once_per_sender_days > 0:
        since = now - timedelta(days=once_per_sender_days)
        if _count(conn, account=account, since=since, rule_name=rule_name, recipient=recipient):
            return f"already answered this sender within {once_per_sender_days} days"
    per_sender = _count(
        conn, account=account, since=now - timedelta(days=1), recipient=recipient, sends_only=True
    )
    if per_sender >= config.max_replies_per_sender_per_day:
        return f"sender cap: {per_sender} replies to this sender in 24 hours"
    per_hour = _count(conn, account=account, since=now - timedelta(hours=1), sends_only=True)
    if per_hour >= config.max_replies_per_hour:
        return f"hourly cap: {per_hour} replies in the last hour"
    return None
