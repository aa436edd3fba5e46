"""Attempts to index a folder's next new message, and the messages set aside after too many.

A message that makes indexing raise, hang or kill the worker would otherwise stop its folder for
good: each pass starts again at the first UID not indexed. So each pass that fetches new mail
first commits an attempt on that UID (``folders.index_attempt_uid`` and ``index_attempts``). From
the second attempt on, that message is fetched alone, so that one bad message cannot hold back the
others of its batch; once it has used up its attempts it is quarantined (a row here) and the folder
goes on past it. A connection dropped mid-pass is not the message's fault: the attempt is given back.
The operator's retry takes a message off the list and moves the folder's progress mark back to it:
the next pass fetches it again as new mail, attempts counted afresh.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, case, delete, select, update

from emailops.store.quarantine import MAX_REASON_CHARS, QuarantinedMessage, set_aside
from emailops.store.schema import folders, index_quarantine


def begin_attempt(conn: Connection, folder_id: int, uid: int) -> int:
    """Count an attempt to index ``uid`` (commit before the work); the attempts so far, this one in."""
    return int(
        conn.execute(
            update(folders)
            .where(folders.c.id == folder_id)
            .values(
                index_attempts=case(
                    (folders.c.index_attempt_uid == uid, folders.c.index_attempts + 1), else_=1
                ),
                index_attempt_uid=uid,
            )
            .returning(folders.c.index_attempts)
        ).scalar_one()
    )


def give_back_attempt(conn: Connection, folder_id: int, uid: int) -> None:
    """The attempt ended for a reason outside the message (the connection dropped)."""
    conn.execute(
        update(folders)
        .where(folders.c.id == folder_id, folders.c.index_attempt_uid == uid, folders.c.index_attempts > 0)
        .values(index_attempts=folders.c.index_attempts - 1)
    )


def quarantine(
    conn: Connection,
    folder_id: int,
    uidvalidity: int,
    uid: int,
    *,
    message_id: str | None,
    attempts: int,
    reason: str,
    now: datetime,
) -> None:
    conn.execute(
        index_quarantine.insert().values(
            folder_id=folder_id,
            uidvalidity=uidvalidity,
            uid=uid,
            message_id=message_id,
            attempts=attempts,
            reason=reason[:MAX_REASON_CHARS],
            quarantined_at=now,
        )
    )


def quarantined_uids(conn: Connection, folder_id: int, uidvalidity: int) -> set[int]:
    return set(
        conn.execute(
            select(index_quarantine.c.uid).where(
                index_quarantine.c.folder_id == folder_id, index_quarantine.c.uidvalidity == uidvalidity
            )
        ).scalars()
    )


def forget_gone(conn: Connection, folder_id: int, uidvalidity: int, uids: set[int]) -> None:
    """The quarantined ``uids`` left the server: there is nothing left to set aside."""
    if uids:
        conn.execute(
            delete(index_quarantine).where(
                index_quarantine.c.folder_id == folder_id,
                index_quarantine.c.uidvalidity == uidvalidity,
                index_quarantine.c.uid.in_(uids),
            )
        )


def remap_uidvalidity(
    conn: Connection, folder_id: int, old: int, new: int, uid_by_message_id: dict[str, int]
) -> None:
    """UIDVALIDITY changed: a quarantined message still in the folder (by Message-ID) stays set
    aside under its new UID; the rest of the old generation is gone."""
    rows = conn.execute(
        select(index_quarantine.c.id, index_quarantine.c.message_id).where(
            index_quarantine.c.folder_id == folder_id, index_quarantine.c.uidvalidity == old
        )
    ).all()
    for row_id, message_id in rows:
        uid = uid_by_message_id.get(message_id or "")
        if uid is None:
            conn.execute(delete(index_quarantine).where(index_quarantine.c.id == row_id))
        else:
            conn.execute(
                update(index_quarantine)
                .where(index_quarantine.c.id == row_id)
                .values(uidvalidity=new, uid=uid)
            )


def list_quarantined(conn: Connection, account: str) -> list[QuarantinedMessage]:
    of_account = folders.c.account == account
    return set_aside(conn, index_quarantine, attempts="attempts", reason="reason", where=of_account)


def retry_quarantined(conn: Connection, row_id: int, account: str) -> bool:
    """Operator: quarantined message ``row_id`` of ``account`` is indexed again by the next pass
    (with fresh attempts); False when there is no such row, or it is of a former UIDVALIDITY."""
    found = conn.execute(
        select(index_quarantine.c.folder_id, index_quarantine.c.uid)
        .join_from(index_quarantine, folders, folders.c.id == index_quarantine.c.folder_id)
        .where(
            index_quarantine.c.id == row_id,
            folders.c.account == account,
            folders.c.uidvalidity == index_quarantine.c.uidvalidity,
        )
    ).first()
    if found is None:
        return False
    folder_id, uid = found
    conn.execute(delete(index_quarantine).where(index_quarantine.c.id == row_id))
    # The count is forgotten too (as save_progress does): the pass compares the UID lists, so a pass
    # under way that moves the mark on again still finds the message missing and fetches it.
    conn.execute(
        update(folders)
        .where(folders.c.id == folder_id)
        .values(
            uidnext=case((folders.c.uidnext > uid, uid), else_=folders.c.uidnext),
            server_count=None,
            index_attempt_uid=uid,
            index_attempts=0,
        )
    )
    return True
