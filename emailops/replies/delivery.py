"""One unit of reply delivery: claim a due outbox row, send it, record the outcome.

Two short transactions around the SMTP conversation: the claim (``sending``) commits before the
first byte goes out, the outcome commits after the answer. A crash in between leaves ``sending``,
which ``outbox.recover_interrupted`` turns into ``unknown`` (see ``OutboxStage``: at once for a
dead claimer of this host, after ``STALE_CLAIM`` by the database's clock for others).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from sqlalchemy import Connection, Engine

from emailops import metrics
from emailops.clock import Clock, utc_now
from emailops.replies import outbox
from emailops.replies.outbox import OutboxRow, OutboxState
from emailops.replies.smtp_sender import (
    PermanentSendError,
    SmtpAuthError,
    SmtpSender,
    TransientSendError,
    UncertainSendError,
)
from emailops.request_ids import request_id
from emailops.store import messages as message_store


@dataclass(frozen=True)
class DeliveryResult:
    outbox_id: int
    recipient: str
    state: OutboxState
    detail: str
    attempts: int


def deliver_next(
    engine: Engine,
    sender: SmtpSender,
    *,
    claimer: str,
    envelope_from: str,
    max_attempts: int,
    account: str | None = None,
    clock: Clock = utc_now,
) -> DeliveryResult | None:
    """Deliver the next due ``send`` reply, or return ``None`` when nothing is due."""
    with engine.begin() as conn:
        row = outbox.claim_next(conn, claimer=claimer, now=clock(), action="send", account=account)
        origin = inbound_origin(conn, row) if row is not None else None
    if row is None:
        return None
    log = structlog.get_logger().bind(
        component="smtp",
        outbox_id=row.id,
        rule=row.rule_name,
        recipient=row.recipient,
        attempt=row.attempts,
        **request_context(origin),
    )
    try:
        answer = sender.send(envelope_from=envelope_from, recipient=row.recipient, raw=row.raw)
    except PermanentSendError as exc:
        with engine.begin() as conn:
            outbox.mark_failed(
                conn, row.id, claimer=claimer, reason=str(exc), now=clock(), attempt=row.attempts
            )
        log.error("reply refused", reason=str(exc), code=exc.code)
        _count(row.rule_name, "failed", "permanent")
        return DeliveryResult(row.id, row.recipient, OutboxState.FAILED, str(exc), row.attempts)
    except UncertainSendError as exc:
        with engine.begin() as conn:
            outbox.mark_unknown(
                conn, row.id, claimer=claimer, reason=str(exc), now=clock(), attempt=row.attempts
            )
        log.error("reply outcome unknown; not retried automatically", reason=str(exc))
        _count(row.rule_name, "unknown", "uncertain")
        return DeliveryResult(row.id, row.recipient, OutboxState.UNKNOWN, str(exc), row.attempts)
    except TransientSendError as exc:
        with engine.begin() as conn:
            state = outbox.mark_transient_failure(
                conn, row, claimer=claimer, reason=str(exc), now=clock(), max_attempts=max_attempts
            )
        log.warning(
            "reply not delivered; will retry" if state is OutboxState.PENDING else "reply failed",
            reason=str(exc),
            code=exc.code,
            state=state.value,
        )
        outcome = "retry" if state is OutboxState.PENDING else "failed"
        _count(row.rule_name, outcome, "transient", auth=isinstance(exc, SmtpAuthError))
        return DeliveryResult(row.id, row.recipient, state, str(exc), row.attempts)
    with engine.begin() as conn:
        taken_from = outbox.mark_sent(conn, row.id, claimer=claimer, now=clock(), attempt=row.attempts)
    if taken_from is None:
        log.info("reply sent", answer=answer)
    else:
        log.warning(
            "reply sent after another process had given up on it; recorded as sent",
            answer=answer,
            previous_state=taken_from.value,
        )
    metrics.reply_outcome(row.rule_name, "sent")
    if origin is not None:
        metrics.reply_latency((clock() - origin.indexed_at).total_seconds())
    return DeliveryResult(row.id, row.recipient, OutboxState.SENT, answer, row.attempts)


def inbound_origin(conn: Connection, row: OutboxRow) -> message_store.MessageOrigin | None:
    """The inbound message a reply answers, while its row exists."""
    return message_store.message_origin(conn, row.message_pk) if row.message_pk is not None else None


def request_context(origin: message_store.MessageOrigin | None) -> dict[str, str]:
    """The log context naming the inbound message's ``request_id`` (see emailops.request_ids)."""
    if origin is None:
        return {}
    return {"request_id": request_id(origin.account, origin.folder, origin.uidvalidity, origin.uid)}


def _count(rule: str, outcome: str, error_kind: str, *, auth: bool = False) -> None:
    metrics.reply_outcome(rule, outcome)
    metrics.smtp_error(error_kind, auth=auth)
