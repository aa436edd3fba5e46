"""A message's processing story for the operator: when it was indexed, which rules match it, what
each decided and why, the replies and model drafts made for it and their delivery, its quarantine,
and the ``request_id`` its log lines carry.

Matching is evaluated now against the rules given (pure: nothing is recorded or sent). What was
decided comes from the log of decisions (``decision_log``), kept REPLY_HISTORY_DAYS: a message
older than that, or decided before the log existed, shows its matches and replies only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from emailops.replies.decision_log import RecordedDecision, for_message
from emailops.request_ids import request_id
from emailops.rules.matching import rule_matches
from emailops.rules.model import RuleSet
from emailops.store.messages import load_message
from emailops.store.schema import folders, llm_jobs, messages, outbox


@dataclass(frozen=True)
class RuleMatch:
    rule: str
    matches: bool


@dataclass(frozen=True)
class ReplyDelivery:
    """A reply (outbox row) made for the message: to whom, and how far its delivery got."""

    outbox_id: int
    rule: str
    action: str
    state: str
    recipient: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


@dataclass(frozen=True)
class DraftJob:
    """A reply a model was asked to write for the message (its reply, once written: ``outbox_id``)."""

    job_id: int
    rule: str
    state: str
    attempts: int
    last_error: str | None
    outbox_id: int | None


@dataclass(frozen=True)
class MessageStory:
    message_pk: int
    account: str
    folder: str
    uid: int
    message_id: str | None
    subject: str
    sender: str
    indexed_at: datetime
    request_id: str
    # history (there before the first sync: never answered), pending, working, done, quarantined.
    rules_state: str
    rules_attempts: int
    quarantine_reason: str | None
    rules: list[RuleMatch]
    decisions: list[RecordedDecision]
    replies: list[ReplyDelivery]
    drafts: list[DraftJob]


def message_story(conn: Connection, message_pk: int, *, account: str, rules: RuleSet) -> MessageStory | None:
    """The story of indexed message ``message_pk`` of ``account`` (None: no such message)."""
    row = conn.execute(
        select(messages.c.indexed_at, messages.c.rules_attempts, messages.c.quarantine_reason)
        .join_from(messages, folders, folders.c.id == messages.c.folder_id)
        .where(messages.c.id == message_pk, folders.c.account == account)
    ).first()
    stored = load_message(conn, message_pk) if row is not None else None
    if row is None or stored is None:
        return None
    parsed = stored.parsed
    return MessageStory(
        message_pk=message_pk,
        account=account,
        folder=stored.folder,
        uid=stored.uid,
        message_id=parsed.message_id,
        subject=parsed.subject,
        sender=parsed.sender.email if parsed.sender else "",
        indexed_at=row.indexed_at,
        request_id=request_id(account, stored.folder, stored.uidvalidity, stored.uid),
        rules_state=stored.rules_state,
        rules_attempts=row.rules_attempts,
        quarantine_reason=row.quarantine_reason if stored.rules_state == "quarantined" else None,
        rules=[RuleMatch(rule.name, rule_matches(rule, parsed, stored.folder)) for rule in rules.rules],
        decisions=for_message(conn, message_pk),
        replies=_replies(conn, message_pk),
        drafts=_drafts(conn, message_pk),
    )


def _replies(conn: Connection, message_pk: int) -> list[ReplyDelivery]:
    c = outbox.c
    query = select(
        c.id, c.rule_name, c.action, c.state, c.recipient, c.attempts, c.last_error, c.created_at, c.sent_at
    ).where(c.message_pk == message_pk)
    return [ReplyDelivery(*row) for row in conn.execute(query.order_by(c.id))]


def _drafts(conn: Connection, message_pk: int) -> list[DraftJob]:
    c = llm_jobs.c
    query = select(c.id, c.rule_name, c.state, c.attempts, c.last_error, c.outbox_id).where(
        c.message_pk == message_pk
    )
    return [DraftJob(*row) for row in conn.execute(query.order_by(c.id))]
