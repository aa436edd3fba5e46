"""The rules stage's claims on messages: attempts counted before the work, stalls, quarantine.

States of ``messages.rules_state`` that new mail moves through::

    pending --claim (attempts + 1, committed first)--> working --decided--> done
    working --raised / stalled, attempts < max-----> pending      (tried again)
    working --raised / stalled, attempts = max-----> quarantined  (reason kept; never tried again)
    quarantined --retry (operator)--> pending (fresh attempts)
    quarantined --release (operator)--> done  (no rule runs: never answered, off the list)
    done --rerun (operator)--> pending (fresh attempts; a reply recorded before is not made again)

The attempt is committed before the rules run, so a message that hangs a worker (killed by the
supervisor) or kills it still counts: it cannot stall worker after worker for ever. A claim not
decided within the claim timeout (timed by the database's clock) is stalled. The claimer and the
attempt number are the claim's fencing token (``store.work_queue``): a paused worker that resumes
after its claim was given to another cannot record a decision. A claim of a process known to be
gone (``processes.is_dead_sibling``) is stalled at once.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, Connection, select, update

from emailops.store import work_queue
from emailops.store.quarantine import MAX_REASON_CHARS, QuarantinedMessage, set_aside
from emailops.store.schema import folders, messages


def _of_account(account: str) -> ColumnElement[bool]:
    return messages.c.folder_id.in_(select(folders.c.id).where(folders.c.account == account))


QUEUE = work_queue.WorkQueue.on(
    messages, pending="pending", working="working", prefix="rules_", of_account=_of_account
)


def claim(conn: Connection, pk: int, claimer: str | None = None) -> int | None:
    """Claim a pending message for ``claimer``; its attempt number (the claim's token with the
    claimer), or None if not pending."""
    taken = work_queue.claim_row(conn, QUEUE, pk, claimer, candidates=messages.c.rules_state == "pending")
    return taken.attempt if taken is not None else None


def finish(conn: Connection, pk: int, attempt: int, *, claimer: str | None) -> bool:
    """Mark the rules done, in the decision's transaction; False if the claim is no longer ours."""
    return work_queue.settle(conn, QUEUE, work_queue.Claim(pk, claimer, attempt), {"rules_state": "done"})


def release_failed(
    conn: Connection, pk: int, attempt: int, *, claimer: str | None, reason: str, max_attempts: int
) -> QuarantinedMessage | None:
    """After the rules raised: pending again, or quarantined once ``max_attempts`` are used up
    (returned, for the caller to report)."""
    quarantine = attempt >= max_attempts
    released = {
        "rules_state": "quarantined" if quarantine else "pending",
        "quarantine_reason": reason[:MAX_REASON_CHARS],
    }
    if not work_queue.settle(conn, QUEUE, work_queue.Claim(pk, claimer, attempt), released) or not quarantine:
        return None
    return next(iter(_quarantined(conn, messages.c.id == pk)), None)


def working_claimers(conn: Connection, account: str | None) -> list[str]:
    """The distinct claimers of messages (of ``account``; None: of all) whose rules are being
    decided now."""
    return work_queue.working_claimers(conn, QUEUE, account)


def recover_stalled(
    conn: Connection,
    account: str | None,
    *,
    claim_timeout: timedelta,
    max_attempts: int,
    dead_claimers: tuple[str, ...] = (),
) -> tuple[int, list[QuarantinedMessage]]:
    """Claims of ``account`` (None: of every account) older than ``claim_timeout`` (their worker
    hung or died), and at once those of ``dead_claimers`` (processes known to be gone). Returns how
    many were made pending again, and the messages quarantined because they used up their attempts."""
    stale = work_queue.stale(conn, QUEUE, claim_timeout=claim_timeout, dead_claimers=dead_claimers)
    query = select(messages.c.id).where(stale)
    found = list(conn.execute(query if account is None else query.where(_of_account(account))).scalars())
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


def _quarantined(conn: Connection, condition: ColumnElement[bool]) -> list[QuarantinedMessage]:
    where = (messages.c.rules_state == "quarantined") & condition
    return set_aside(conn, messages, attempts="rules_attempts", reason="quarantine_reason", where=where)


def retry_quarantined(conn: Connection, pk: int, account: str) -> bool:
    """Operator: a quarantined message of ``account`` goes back to its rules with fresh attempts
    (quarantined again if they are used up again)."""
    return work_queue.change_by_operator(
        conn, QUEUE, pk, account=account, allowed=("quarantined",), values=work_queue.retry_values(QUEUE)
    )


def release_quarantined(conn: Connection, pk: int, account: str) -> bool:
    """Operator: a quarantined message of ``account`` is done without its rules running (the
    operator answers it, if at all); its reason stays for the record."""
    done = {"rules_state": "done", "rules_claimed_by": None}
    return work_queue.change_by_operator(
        conn, QUEUE, pk, account=account, allowed=("quarantined",), values=done
    )


def rerun(conn: Connection, pk: int, account: str) -> bool:
    """Operator: the rules of a done or quarantined message of ``account`` run again."""
    return work_queue.change_by_operator(
        conn,
        QUEUE,
        pk,
        account=account,
        allowed=("done", "quarantined"),
        values=work_queue.retry_values(QUEUE),
    )
