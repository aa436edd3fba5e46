"""The rules stage's claims on messages: attempts counted before the work, stalls, quarantine.

States of ``messages.rules_state`` that new mail moves through::

    pending --claim (attempts + 1, committed first)--> working --decided--> done
    working --raised / stalled, attempts < max-----> pending      (tried again)
    working --raised / stalled, attempts = max-----> quarantined  (reason kept; never tried again)

The attempt is committed before the rules run, so a message that hangs a worker (killed by the
supervisor) or kills it still counts: it cannot stall worker after worker for ever. A claim not
decided within the claim timeout (timed by the database's clock) is stalled. The attempt number is
the claim's fencing token: a paused worker that resumes after its claim was given to another cannot
record a decision. A claim of a process known to be gone (``processes.is_dead_sibling``) is
stalled at once.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection, or_, select, update

from emailops.store.db_clock import db_now
from emailops.store.quarantine import MAX_REASON_CHARS, QuarantinedMessage
from emailops.store.schema import folders, messages


def claim(conn: Connection, pk: int, claimer: str | None = None) -> int | None:
    """Claim a pending message for ``claimer``; its attempt number (the claim's token), or None if
    not pending."""
    return conn.execute(
        update(messages)
        .where(messages.c.id == pk, messages.c.rules_state == "pending")
        .values(
            rules_state="working",
            rules_attempts=messages.c.rules_attempts + 1,
            rules_claimed_at=db_now(conn),
            rules_claimed_by=claimer,
        )
        .returning(messages.c.rules_attempts)
    ).scalar_one_or_none()


def finish(conn: Connection, pk: int, attempt: int) -> bool:
    """Mark the rules done, in the decision's transaction; False if the claim is no longer ours."""
    result = conn.execute(
        update(messages)
        .where(messages.c.id == pk, messages.c.rules_state == "working", messages.c.rules_attempts == attempt)
        .values(rules_state="done")
    )
    return result.rowcount == 1


def release_failed(
    conn: Connection, pk: int, attempt: int, *, reason: str, max_attempts: int
) -> QuarantinedMessage | None:
    """After the rules raised: pending again, or quarantined once ``max_attempts`` are used up
    (returned, for the caller to report)."""
    quarantine = attempt >= max_attempts
    conn.execute(
        update(messages)
        .where(messages.c.id == pk, messages.c.rules_state == "working", messages.c.rules_attempts == attempt)
        .values(
            rules_state="quarantined" if quarantine else "pending",
            quarantine_reason=reason[:MAX_REASON_CHARS],
        )
    )
    if not quarantine:
        return None
    return next(iter(_quarantined(conn, messages.c.id == pk)), None)


def working_claimers(conn: Connection, account: str) -> list[str]:
    """The distinct claimers of messages whose rules are being decided now."""
    return list(
        conn.execute(
            select(messages.c.rules_claimed_by)
            .where(
                messages.c.rules_state == "working",
                messages.c.rules_claimed_by.is_not(None),
                messages.c.folder_id.in_(select(folders.c.id).where(folders.c.account == account)),
            )
            .distinct()
        ).scalars()
    )


def recover_stalled(
    conn: Connection,
    account: str,
    *,
    claim_timeout: timedelta,
    max_attempts: int,
    dead_claimers: tuple[str, ...] = (),
) -> tuple[int, list[QuarantinedMessage]]:
    """Claims older than ``claim_timeout`` (their worker hung or died), and at once those of
    ``dead_claimers`` (processes known to be gone). Returns how many were made pending again, and
    the messages quarantined because they used up their attempts."""
    stalled = select(messages.c.id).where(
        messages.c.rules_state == "working",
        or_(
            messages.c.rules_claimed_at < db_now(conn, -claim_timeout),
            messages.c.rules_claimed_by.in_(dead_claimers),
        ),
        messages.c.folder_id.in_(select(folders.c.id).where(folders.c.account == account)),
    )
    found = list(conn.execute(stalled).scalars())
    if not found:
        return 0, []
    reason = f"the rules did not finish {max_attempts} times: the message hangs or kills the worker"
    used_up = messages.c.rules_attempts >= max_attempts
    base = update(messages).where(messages.c.id.in_(found), messages.c.rules_state == "working")
    quarantined_ids = list(
        conn.execute(
            base.where(used_up)
            .values(rules_state="quarantined", quarantine_reason=reason)
            .returning(messages.c.id)
        ).scalars()
    )
    retried = conn.execute(base.where(~used_up).values(rules_state="pending")).rowcount
    return retried, _quarantined(conn, messages.c.id.in_(quarantined_ids)) if quarantined_ids else []


def list_quarantined(conn: Connection, account: str) -> list[QuarantinedMessage]:
    return _quarantined(conn, folders.c.account == account)


def _quarantined(conn: Connection, condition: object) -> list[QuarantinedMessage]:
    rows = conn.execute(
        select(
            folders.c.name,
            messages.c.uidvalidity,
            messages.c.uid,
            messages.c.message_id,
            messages.c.rules_attempts,
            messages.c.quarantine_reason,
        )
        .join(folders, folders.c.id == messages.c.folder_id)
        .where(messages.c.rules_state == "quarantined", condition)  # type: ignore[arg-type]
        .order_by(messages.c.id)
    ).all()
    return [QuarantinedMessage(*row[:5], reason=row[5] or "") for row in rows]
