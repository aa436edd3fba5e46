"""Try the rules on one message without acting: ``emailops rules test FILE.eml``, and the
console's rule test on an uploaded message or an indexed one.

The decision is the daemon's own (``decisions.apply_rules``), made against the real index so that
"already answered this sender" and the caps are what they would be, inside a transaction that is
rolled back: nothing is recorded. The message is indexed in that transaction and read back as the
daemon reads it (``messages.load_message``), so the rules see what they would see in the daemon.
A model's reply is then asked of the model for real (outside the transaction) and composed as the
stage would compose it. Nothing is sent or saved.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import Connection, Engine, select
from structlog.typing import FilteringBoundLogger

from emailops.config import ReplyConfig
from emailops.llm import jobs
from emailops.llm.client import ChatClient, ChatRequest, LlmError
from emailops.llm.prompt import EmptyReplyError, chat_messages, reply_text
from emailops.mime.model import ParsedMessage
from emailops.mime.parse import parse_message
from emailops.replies import decisions, outbox
from emailops.replies.compose import build_reply
from emailops.rules.model import RuleSet
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.content import message_content
from emailops.store.schema import folders, messages


def _warnings_only() -> FilteringBoundLogger:
    """The configured log, keeping only warnings and errors."""
    logger: FilteringBoundLogger = structlog.wrap_logger(
        None, wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), trial=True
    )
    return logger


@dataclass(frozen=True)
class ModelCall:
    model: str
    latency_ms: int
    tokens_in: int | None = None
    tokens_out: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class TrialOutcome:
    rule: str
    # send, draft, or None for a rule without a reply.
    reply_action: str | None
    # "would reply", "suppressed", "already recorded", "model failed" or "no reply".
    verdict: str
    reason: str | None = None
    mailbox_actions: tuple[str, ...] = ()
    # The reply (or draft) as it would be sent or saved.
    reply: bytes | None = None
    model_call: ModelCall | None = None


def try_rules(
    engine: Engine,
    *,
    account: str,
    folder: str,
    parsed: ParsedMessage,
    rules: RuleSet,
    config: ReplyConfig,
    client: ChatClient | None,
    now: datetime,
) -> list[TrialOutcome]:
    """What the rules would do with ``parsed`` arriving in ``folder``; see the module doc."""
    config = dataclasses.replace(config, dry_run=False)
    outcomes: list[TrialOutcome] = []
    asks: list[tuple[int, decisions.Decision, jobs.LlmJob]] = []
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            parsed, pk = _stored(conn, account, folder, parsed, now)
            made = decisions.apply_rules(
                conn,
                account=account,
                message_pk=pk,
                folder=folder,
                uidvalidity=_TRIAL_UIDVALIDITY,
                uid=_TRIAL_UID,
                parsed=parsed,
                rules=rules,
                config=config,
                now=now,
                # "reply recorded" of work rolled back would mislead: the outcome is printed instead.
                log=_warnings_only(),
            )
            for decision in made:
                actions = tuple(a.kind.value for a in decision.mailbox_actions)
                if decision.reply_action is None:
                    outcomes.append(TrialOutcome(decision.rule, None, "no reply", mailbox_actions=actions))
                elif decision.suppressed is not None:
                    outcomes.append(
                        TrialOutcome(
                            decision.rule, decision.reply_action, "suppressed", decision.suppressed, actions
                        )
                    )
                elif not decision.created:
                    where = (
                        f"outbox reply {decision.outbox_id}"
                        if decision.outbox_id is not None
                        else f"model job {decision.llm_job_id}"
                    )
                    outcomes.append(
                        TrialOutcome(decision.rule, decision.reply_action, "already recorded", where, actions)
                    )
                elif decision.llm_job_id is not None:
                    job = jobs.get_job(conn, decision.llm_job_id)
                    assert job is not None
                    asks.append((len(outcomes), decision, job))
                    outcomes.append(TrialOutcome(decision.rule, decision.reply_action, "would reply"))
                else:
                    assert decision.outbox_id is not None
                    row = outbox.get_reply(conn, decision.outbox_id)
                    assert row is not None
                    outcomes.append(
                        TrialOutcome(
                            decision.rule, decision.reply_action, "would reply", None, actions, reply=row.raw
                        )
                    )
        finally:
            transaction.rollback()
    for index, decision, job in asks:
        actions = tuple(a.kind.value for a in decision.mailbox_actions)
        outcomes[index] = _ask_model(client, job, parsed, config, now, decision.rule, actions)
    return outcomes


def try_rules_on_raw(
    engine: Engine,
    raw: bytes,
    *,
    max_message_bytes: int,
    account: str,
    folder: str,
    rules: RuleSet,
    config: ReplyConfig,
    client: ChatClient | None,
    now: datetime,
) -> list[TrialOutcome]:
    """``try_rules`` on a message as a file holds it (parsed as the daemon parses new mail)."""
    parsed = parse_message(raw, max_message_bytes=max_message_bytes)
    return try_rules(
        engine,
        account=account,
        folder=folder,
        parsed=parsed,
        rules=rules,
        config=config,
        client=client,
        now=now,
    )


def try_rules_on_indexed(
    engine: Engine,
    message_pk: int,
    *,
    account: str,
    rules: RuleSet,
    config: ReplyConfig,
    client: ChatClient | None,
    now: datetime,
) -> list[TrialOutcome] | None:
    """``try_rules`` on indexed message ``message_pk`` of ``account`` as if it arrived again in
    its folder (a reply recorded for it shows as "already recorded"); None: no such message."""
    with engine.connect() as conn:
        owner = conn.execute(
            select(folders.c.account)
            .join_from(messages, folders, folders.c.id == messages.c.folder_id)
            .where(messages.c.id == message_pk)
        ).scalar_one_or_none()
        stored = message_store.load_message(conn, message_pk) if owner == account else None
    if stored is None:
        return None
    return try_rules(
        engine,
        account=account,
        folder=stored.folder,
        parsed=stored.parsed,
        rules=rules,
        config=config,
        client=client,
        now=now,
    )


# Where the trial's message is indexed for the length of the trial: no server gives a UID or a
# UIDVALIDITY of 0 (RFC 3501 section 2.3.1.1), so no indexed message is in the way.
_TRIAL_UIDVALIDITY = 0
_TRIAL_UID = 0


def _stored(
    conn: Connection, account: str, folder: str, parsed: ParsedMessage, now: datetime
) -> tuple[ParsedMessage, int]:
    """``parsed`` indexed in ``folder`` and read back as the daemon reads it; and its row's key."""
    folder_id = folder_store.ensure_folder(conn, account, folder).id
    item = message_store.FetchedMessage(_TRIAL_UID, (), now, None, message_content(parsed))
    inserted = message_store.insert_messages(
        conn, folder_id, _TRIAL_UIDVALIDITY, [item], baseline_uidnext=None, now=now
    )
    stored = message_store.load_message(conn, inserted[_TRIAL_UID])
    assert stored is not None  # inserted just now, in this transaction
    return stored.parsed, stored.pk


def _ask_model(
    client: ChatClient | None,
    job: jobs.LlmJob,
    parsed: ParsedMessage,
    config: ReplyConfig,
    now: datetime,
    rule: str,
    actions: tuple[str, ...],
) -> TrialOutcome:
    assert client is not None, "a model job is only recorded with a model configured"
    started = time.monotonic()
    request = ChatRequest(
        model=job.model,
        messages=chat_messages(job.prompt),
        max_tokens=job.max_tokens,
        temperature=job.temperature,
    )
    try:
        completion = client.complete(request)
        text = reply_text(completion.text)
    except (LlmError, EmptyReplyError) as exc:
        call = ModelCall(job.model, round((time.monotonic() - started) * 1000), error=str(exc))
        return TrialOutcome(rule, job.action, "model failed", str(exc), actions, model_call=call)
    call = ModelCall(
        job.model, round((time.monotonic() - started) * 1000), completion.tokens_in, completion.tokens_out
    )
    composed = build_reply(
        parsed,
        from_address=config.from_address,
        inbound_key=job.inbound_key,
        rule_name=job.rule_name,
        body_text=text,
        subject=job.subject,
        now=now,
    )
    return TrialOutcome(rule, job.action, "would reply", None, actions, reply=composed.raw, model_call=call)
