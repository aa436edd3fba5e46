"""Reply rate limits, counted from the outbox inside the caller's transaction.

- per rule and sender: a rule answers one address at most once per ``once_per_sender_days``
  (drafts count too: a draft is the rule's answer, held for a human);
- per sender per day, all rules: ``ReplyConfig.max_replies_per_sender_per_day`` (sends only);
- per hour for the account: ``ReplyConfig.max_replies_per_hour`` (sends only), the storm breaker.

Every outbox row except ``cancelled`` counts, whatever its delivery state: a failed reply was still
a decision to answer. Recipients are stored lower-cased, so the counts compare exactly.

Concurrency: SQLite serialises writers (``BEGIN IMMEDIATE``). On PostgreSQL ``lock_recipient``
takes a transaction-scoped advisory lock on (account, recipient) so that two workers cannot both
decide to answer the same address; the per-hour cap may overshoot by at most one reply per
concurrent worker.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, func, select, text

from emailops.config import ReplyConfig
from emailops.store.schema import outbox

_COUNTED = outbox.c.state != "cancelled"


def lock_recipient(conn: Connection, *, account: str, recipient: str) -> None:
    """Serialise reply decisions for one recipient until the transaction ends (PostgreSQL only)."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": f"emailops.reply:{account}:{recipient}"},
        )


def _count(conn: Connection, *conditions: ColumnElement[bool]) -> int:
    return conn.execute(select(func.count()).select_from(outbox).where(_COUNTED, *conditions)).scalar_one()


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
        if _count(
            conn,
            outbox.c.account == account,
            outbox.c.rule_name == rule_name,
            outbox.c.recipient == recipient,
            outbox.c.created_at > since,
        ):
            return f"already answered this sender within {once_per_sender_days} days"
    sent_by_us = (outbox.c.account == account, outbox.c.action == "send")
    per_sender = _count(
        conn, *sent_by_us, outbox.c.recipient == recipient, outbox.c.created_at > now - timedelta(days=1)
    )
    if per_sender >= config.max_replies_per_sender_per_day:
        return f"sender cap: {per_sender} replies to this sender in 24 hours"
    per_hour = _count(conn, *sent_by_us, outbox.c.created_at > now - timedelta(hours=1))
    if per_hour >= config.max_replies_per_hour:
        return f"hourly cap: {per_hour} replies in the last hour"
    return None
