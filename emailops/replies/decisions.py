"""Apply the rules to one newly indexed message, inside the caller's transaction.

``apply_rules`` is called in the same transaction that marks the message's rules as done, so the
decision and the outbox row commit together or not at all: a crash before the commit re-runs the
decision, after it the unique outbox key makes a re-run a no-op. It returns ``Decision``s; the
caller performs ``mailbox_actions(decisions)`` (flag, seen, move) only after the commit, and
delivers outbox rows separately (``delivery.deliver_next``, drafts via ``imap_actions``).

Per matching rule (file order, ``stop`` ends the list): an already recorded reply is reported as
it is; otherwise the robot checks (``robots``), then the limits (``limits``) decide; a reply that
passes is composed now and stored ``pending``. Dry run (``ReplyConfig.dry_run``): every decision is
logged and returned, but nothing is recorded and no mailbox action is planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import structlog
from sqlalchemy import Connection
from structlog.typing import FilteringBoundLogger

from emailops.config import ReplyConfig
from emailops.llm import decision as llm_decision
from emailops.mime.model import ParsedMessage
from emailops.replies import limits, outbox
from emailops.replies.compose import AddressError, ComposedReply, build_reply, clean_message_id
from emailops.replies.robots import reply_suppression_reason
from emailops.rules.matching import matching_rules
from emailops.rules.model import Rule, RuleSet
from emailops.rules.templates import template_values

_MAX_KEY = 1000


class MailboxActionKind(StrEnum):
    FLAG = "flag"
    MARK_SEEN = "mark_seen"
    MOVE = "move"


@dataclass(frozen=True)
class MailboxAction:
    kind: MailboxActionKind
    folder: str | None = None


@dataclass(frozen=True)
class Decision:
    """What one matching rule decided for one message.

    ``reply_action`` is ``"send"``/``"draft"`` for a rule with a reply, else ``None``. When a reply
    was wanted: ``outbox_id`` is its row, or for a model's reply ``llm_job_id`` the job that will
    write it (``created`` False if it was recorded before), or ``suppressed`` says why there is
    none. ``dry_run`` decisions record nothing.
    """

    rule: str
    reply_action: str | None
    outbox_id: int | None = None
    created: bool = False
    suppressed: str | None = None
    mailbox_actions: tuple[MailboxAction, ...] = ()
    dry_run: bool = False
    llm_job_id: int | None = None


def inbound_key(parsed: ParsedMessage, *, folder: str, uidvalidity: int, uid: int) -> str:
    """The outbox's identity of an inbound message: its Message-ID, else folder/UIDVALIDITY/UID.

    A malformed Message-ID is not used: a constant bogus id would make every later message with it
    look already answered.
    """
    message_id = clean_message_id(parsed.message_id)
    if message_id and len(message_id) <= _MAX_KEY:
        return message_id
    return f"{folder}/{uidvalidity}/{uid}"[-_MAX_KEY:]


def _rule_mailbox_actions(rule: Rule) -> tuple[MailboxAction, ...]:
    actions = []
    if rule.flag:
        actions.append(MailboxAction(MailboxActionKind.FLAG))
    if rule.mark_seen:
        actions.append(MailboxAction(MailboxActionKind.MARK_SEEN))
    if rule.move_to:
        actions.append(MailboxAction(MailboxActionKind.MOVE, rule.move_to))
    return tuple(actions)


def mailbox_actions(decisions: list[Decision]) -> list[MailboxAction]:
    """The mailbox changes to make after the commit: flags first, then at most one move (the first)."""
    changes: list[MailboxAction] = []
    move: MailboxAction | None = None
    for decision in decisions:
        for action in decision.mailbox_actions:
            if action.kind is MailboxActionKind.MOVE:
                move = move or action
            elif action not in changes:
                changes.append(action)
    return [*changes, move] if move else changes


def apply_rules(
    conn: Connection,
    *,
    account: str,
    message_pk: int | None,
    folder: str,
    uidvalidity: int,
    uid: int,
    parsed: ParsedMessage,
    rules: RuleSet,
    config: ReplyConfig,
    now: datetime,
    log: FilteringBoundLogger | None = None,
) -> list[Decision]:
    """Decide for every matching rule; record replies in ``conn``'s transaction (see module doc).

    ``log``: where the decisions are logged, the daemon's log by default."""
    log = log or structlog.get_logger()
    inbound = _Inbound(
        conn=conn,
        account=account,
        message_pk=message_pk,
        folder=folder,
        parsed=parsed,
        config=config,
        now=now,
        key=inbound_key(parsed, folder=folder, uidvalidity=uidvalidity, uid=uid),
        log=log.bind(component="rules", folder=folder, uid=uid, uidvalidity=uidvalidity),
    )
    matched = matching_rules(rules, parsed, folder, config.account_name)
    return [_decide(inbound, rule) for rule in matched]


@dataclass
class _Inbound:
    """One message being decided on, and what its rules share: the transaction, the outbox key,
    the log context, and the robot check (made once, on the first rule that wants a reply)."""

    conn: Connection
    account: str
    message_pk: int | None
    folder: str
    parsed: ParsedMessage
    config: ReplyConfig
    now: datetime
    key: str
    log: FilteringBoundLogger
    _robot_reason: str | None = None
    _robots_checked: bool = False

    def robot_reason(self) -> str | None:
        if not self._robots_checked:
            self._robot_reason = reply_suppression_reason(self.parsed, self.config)
            self._robots_checked = True
        return self._robot_reason


def _decide(inbound: _Inbound, rule: Rule) -> Decision:
    """One matching rule: its mailbox actions, and its reply recorded, found recorded, or suppressed."""
    dry_run = inbound.config.dry_run
    planned = () if dry_run else _rule_mailbox_actions(rule)
    if rule.reply is None:
        inbound.log.info(
            "rule matched",
            rule=rule.name,
            actions=[a.kind.value for a in _rule_mailbox_actions(rule)],
            dry_run=dry_run,
        )
        return Decision(rule.name, None, mailbox_actions=planned, dry_run=dry_run)
    action = rule.reply.action.value
    recorded = _already_recorded(inbound, rule, action, planned)
    if recorded is not None:
        return recorded
    composed, reason = _compose_unless_suppressed(inbound, rule)
    if reason is not None or composed is None:
        inbound.log.info(
            "reply suppressed", rule=rule.name, reason=reason, sender=_sender(inbound.parsed), dry_run=dry_run
        )
        return Decision(rule.name, action, suppressed=reason, mailbox_actions=planned, dry_run=dry_run)
    if dry_run:
        inbound.log.info(
            "dry run: would reply",
            rule=rule.name,
            reply_action=action,
            recipient=composed.recipient,
            subject=composed.subject,
        )
        return Decision(rule.name, action, dry_run=True)
    return _record(inbound, rule, action, composed, planned)


def _already_recorded(
    inbound: _Inbound, rule: Rule, action: str, planned: tuple[MailboxAction, ...]
) -> Decision | None:
    """The reply (or the model's job) a run before this one recorded, reported as it is."""
    assert rule.reply is not None
    conn, account, key = inbound.conn, inbound.account, inbound.key
    existing = outbox.find_reply(conn, account=account, inbound_key=key, rule_name=rule.name)
    if existing is not None:
        inbound.log.info("reply already recorded", rule=rule.name, outbox_id=existing)
        return Decision(rule.name, action, outbox_id=existing, mailbox_actions=planned)
    job = None if rule.reply.llm is None else llm_decision.find(conn, account, key, rule.name)
    if job is not None:
        inbound.log.info("model reply already recorded", rule=rule.name, llm_job_id=job)
        return Decision(rule.name, action, llm_job_id=job, mailbox_actions=planned)
    return None


def _compose_unless_suppressed(inbound: _Inbound, rule: Rule) -> tuple[ComposedReply | None, str | None]:
    """The reply composed, or why there is none: a robot, no valid address, a limit, no model."""
    assert rule.reply is not None
    reason = inbound.robot_reason()
    if reason is not None:
        return None, reason
    parsed, config = inbound.parsed, inbound.config
    values = template_values(parsed, folder=inbound.folder, rule=rule.name, my_address=config.from_address)
    try:
        composed = build_reply(
            parsed,
            from_address=config.from_address,
            inbound_key=inbound.key,
            rule_name=rule.name,
            # A model's reply: the text comes later; composed now for its recipient and subject.
            body_text=rule.reply.body.render(values) if rule.reply.body else "",
            html_text=rule.reply.html.render(values, escape_html=True) if rule.reply.html else None,
            subject=rule.reply.subject.render(values) if rule.reply.subject else None,
            now=inbound.now,
        )
    except AddressError as exc:
        return None, f"no valid address ({exc})"
    limits.lock_recipient(inbound.conn, account=inbound.account, recipient=composed.recipient)
    reason = limits.limit_reason(
        inbound.conn,
        account=inbound.account,
        rule_name=rule.name,
        recipient=composed.recipient,
        once_per_sender_days=rule.reply.once_per_sender_days,
        config=config,
        now=inbound.now,
    )
    if reason is None and rule.reply.llm is not None:
        reason = llm_decision.unavailable_reason(config)
    return composed, reason


def _record(
    inbound: _Inbound, rule: Rule, action: str, composed: ComposedReply, planned: tuple[MailboxAction, ...]
) -> Decision:
    """Store the reply ``pending`` in the outbox, or a model's reply as a job that will write it."""
    assert rule.reply is not None
    if rule.reply.llm is not None:
        job_id, created = llm_decision.record(
            inbound.conn,
            account=inbound.account,
            inbound_key=inbound.key,
            message_pk=inbound.message_pk,
            rule=rule,
            parsed=inbound.parsed,
            folder=inbound.folder,
            recipient=composed.recipient,
            subject=composed.subject,
            config=inbound.config,
            now=inbound.now,
        )
        inbound.log.info("model reply recorded", rule=rule.name, reply_action=action, llm_job_id=job_id)
        return Decision(rule.name, action, llm_job_id=job_id, created=created, mailbox_actions=planned)
    outbox_id, created = outbox.insert_reply(
        inbound.conn,
        account=inbound.account,
        inbound_key=inbound.key,
        message_pk=inbound.message_pk,
        rule_name=rule.name,
        action=action,
        recipient=composed.recipient,
        reply_message_id=composed.message_id,
        subject=composed.subject,
        raw=composed.raw,
        now=inbound.now,
    )
    inbound.log.info(
        "reply recorded",
        rule=rule.name,
        reply_action=action,
        outbox_id=outbox_id,
        recipient=composed.recipient,
    )
    return Decision(rule.name, action, outbox_id=outbox_id, created=created, mailbox_actions=planned)


def _sender(parsed: ParsedMessage) -> str:
    return parsed.sender.email if parsed.sender else ""
