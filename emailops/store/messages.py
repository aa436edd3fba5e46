"""Writing and reading indexed messages. Every write is idempotent on (folder, UIDVALIDITY, UID)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, and_, bindparam, func, select, update
from sqlalchemy.sql.selectable import ScalarSelect

from emailops.mime.header_block import HeaderBlock
from emailops.mime.model import Address, Attachment, ParsedMessage
from emailops.store import batch_insert, fulltext
from emailops.store.content import MessageContent
from emailops.store.dialect import insert_unless_present, writer_is_exclusive
from emailops.store.schema import attachments, folders, messages


@dataclass(frozen=True)
class FetchedMessage:
    """A message as fetched from one folder: the server's facts plus what the index keeps of its
    content (``content.message_content(parsed)``)."""

    uid: int
    flags: tuple[str, ...]
    internal_date: datetime | None
    modseq: int | None
    content: MessageContent


def _row(
    folder_id: int, uidvalidity: int, item: FetchedMessage, rules_state: str, now: datetime
) -> dict[str, object]:
    return {
        **item.content.columns,
        "folder_id": folder_id,
        "uidvalidity": uidvalidity,
        "uid": item.uid,
        "internal_date": item.internal_date,
        "flags": " ".join(item.flags),
        "modseq": item.modseq,
        "indexed_at": now,
        "rules_state": rules_state,
    }


_KEY = ("folder_id", "uidvalidity", "uid")


def _insert_new_exclusive(
    conn: Connection, folder_id: int, uidvalidity: int, rows: list[dict[str, object]]
) -> dict[int, int]:
    """Insert the rows not indexed yet; return uid -> primary key of those inserted. For a writer
    that excludes every other (SQLite): the UIDs present are read first, only the rest are inserted
    (INSERT .. ON CONFLICT DO NOTHING all the same), and their keys are read back: SQLAlchemy
    executes RETURNING there as multi-row VALUES batches, which is slower than this (bench/README.md).
    """
    statement = insert_unless_present(conn, messages, _KEY)
    uids = [int(row["uid"]) for row in rows]  # type: ignore[call-overload]
    in_batch = and_(
        messages.c.folder_id == folder_id,
        messages.c.uidvalidity == uidvalidity,
        messages.c.uid.between(min(uids), max(uids)),
    )
    present = set(conn.execute(select(messages.c.uid).where(in_batch)).scalars())
    fresh = [row for row in rows if row["uid"] not in present]
    if not fresh:
        return {}
    conn.execute(statement, fresh)
    wanted = {int(row["uid"]) for row in fresh}  # type: ignore[call-overload]
    return {
        uid: pk
        for pk, uid in conn.execute(select(messages.c.id, messages.c.uid).where(in_batch)).all()
        if uid in wanted
    }


def _store_exclusive(
    conn: Connection,
    folder_id: int,
    uidvalidity: int,
    rows: list[dict[str, object]],
    by_uid: Mapping[int, MessageContent],
) -> dict[int, int]:
    """SQLite: the new rows, then their search terms and attachments, statement after statement
    (each is a call into the library in this process, not a round trip)."""
    inserted = _insert_new_exclusive(conn, folder_id, uidvalidity, rows)
    fulltext.index_rows(conn, ((pk, by_uid[uid].search_terms) for uid, pk in inserted.items()))
    attachment_rows = [
        {"message_pk": pk, "filename": filename, "content_type": content_type, "size": size}
        for uid, pk in inserted.items()
        for filename, content_type, size in by_uid[uid].attachments
    ]
    if attachment_rows:
        conn.execute(attachments.insert(), attachment_rows)
    return inserted


def insert_messages(
    conn: Connection,
    folder_id: int,
    uidvalidity: int,
    batch: Sequence[FetchedMessage],
    *,
    baseline_uidnext: int | None,
    now: datetime,
) -> dict[int, int]:
    """Insert what is not indexed yet (INSERT .. ON CONFLICT DO NOTHING on (folder, UIDVALIDITY,
    UID)), with its search terms and attachments; return UID -> primary key of the rows inserted.

    A message whose UID is at or above the folder's baseline arrived after the first sync and is
    ``pending`` for the rules; one below it was there before and is ``history``.
    """
    if not batch:
        return {}

    def state(uid: int) -> str:
        return "pending" if baseline_uidnext is not None and uid >= baseline_uidnext else "history"

    rows = [_row(folder_id, uidvalidity, item, state(item.uid), now) for item in batch]
    by_uid = {item.uid: item.content for item in batch}
    if writer_is_exclusive(conn):
        return _store_exclusive(conn, folder_id, uidvalidity, rows, by_uid)
    return batch_insert.store_batch(conn, rows, by_uid)  # PostgreSQL


def live_uids(conn: Connection, folder_id: int, uidvalidity: int) -> set[int]:
    """UIDs indexed and not marked expunged."""
    return set(
        conn.execute(
            select(messages.c.uid).where(
                messages.c.folder_id == folder_id,
                messages.c.uidvalidity == uidvalidity,
                messages.c.expunged_at.is_(None),
            )
        ).scalars()
    )


# Up to this many UIDs are looked up with IN (...); more, and the folder's rows are read at once
# (bound parameters are limited per statement, and one scan is then cheaper anyway).
_UID_LOOKUP_LIMIT = 1_000


def update_flags(
    conn: Connection,
    folder_id: int,
    uidvalidity: int,
    server: Mapping[int, tuple[tuple[str, ...], int | None]],
) -> int:
    """Bring the stored flags and MODSEQ up to the server's (uid -> (flags, modseq)); return how
    many messages' flags changed.

    Only rows that differ are written. A message fetched earlier in the same pass comes back from
    CHANGEDSINCE with the flags just stored: it is neither rewritten nor counted as a change.
    """
    if not server:
        return 0
    query = select(messages.c.uid, messages.c.flags, messages.c.modseq).where(
        messages.c.folder_id == folder_id,
        messages.c.uidvalidity == uidvalidity,
        messages.c.expunged_at.is_(None),
    )
    if len(server) <= _UID_LOOKUP_LIMIT:
        query = query.where(messages.c.uid.in_(list(server)))
    stored = {uid: (flags, modseq) for uid, flags, modseq in conn.execute(query)}
    params = []
    flag_changes = 0
    for uid, (flags, modseq) in server.items():
        if uid not in stored:
            continue
        stored_flags, stored_modseq = stored[uid]
        flags_differ = set(stored_flags.split()) != set(flags)
        if not flags_differ and stored_modseq == modseq:
            continue
        flag_changes += flags_differ
        params.append(
            {
                "f_id": folder_id,
                "f_uv": uidvalidity,
                "f_uid": uid,
                "f_flags": " ".join(flags),
                "f_modseq": modseq,
            }
        )
    if params:
        conn.execute(
            update(messages)
            .where(
                messages.c.folder_id == bindparam("f_id"),
                messages.c.uidvalidity == bindparam("f_uv"),
                messages.c.uid == bindparam("f_uid"),
            )
            .values(flags=bindparam("f_flags"), modseq=bindparam("f_modseq")),
            params,
        )
    return flag_changes


def mark_expunged(
    conn: Connection, folder_id: int, uidvalidity: int, uids: Iterable[int], now: datetime
) -> int:
    """Mark messages that left the server; they stay in the index, flagged, not silently dropped."""
    uid_list = sorted(uids)
    count = 0
    for start in range(0, len(uid_list), 500):
        chunk = uid_list[start : start + 500]
        count += conn.execute(
            update(messages)
            .where(
                messages.c.folder_id == folder_id,
                messages.c.uidvalidity == uidvalidity,
                messages.c.uid.in_(chunk),
                messages.c.expunged_at.is_(None),
            )
            .values(expunged_at=now)
        ).rowcount
    return count


def remap_uidvalidity(
    conn: Connection,
    folder_id: int,
    old_uidvalidity: int,
    new_uidvalidity: int,
    uid_by_message_id: Mapping[str, int],
) -> set[int]:
    """Move rows of the old UIDVALIDITY to their new UIDs, matched by Message-ID.

    Rows keep their primary key, rules state and outbox history, so a recreated mailbox neither
    duplicates the index nor re-answers anything. Returns the new UIDs that were matched; rows left
    on the old UIDVALIDITY are the caller's to mark expunged.
    """
    rows = conn.execute(
        select(messages.c.id, messages.c.message_id)
        .where(
            messages.c.folder_id == folder_id,
            messages.c.uidvalidity == old_uidvalidity,
            messages.c.message_id.is_not(None),
        )
        .order_by(messages.c.id)
    ).all()
    taken: set[int] = set()
    params = []
    for pk, message_id in rows:
        uid = uid_by_message_id.get(message_id)
        if uid is None or uid in taken:
            continue
        taken.add(uid)
        params.append({"r_pk": pk, "r_uid": uid})
    if params:
        conn.execute(
            update(messages)
            .where(messages.c.id == bindparam("r_pk"))
            .values(uidvalidity=new_uidvalidity, uid=bindparam("r_uid"), expunged_at=None),
            params,
        )
    return taken


# Messages whose rules have not run yet (read through ix_messages_rules_pending).
_RULES_PENDING = messages.c.rules_state == "pending"


def pending_for_rules(conn: Connection, account: str, limit: int = 100) -> list[int]:
    """Primary keys of messages whose rules have not run yet, oldest first."""
    return list(
        conn.execute(
            select(messages.c.id)
            .join(folders, folders.c.id == messages.c.folder_id)
            .where(_RULES_PENDING, folders.c.account == account)
            .order_by(messages.c.id)
            .limit(limit)
        ).scalars()
    )


def accounts_pending_for_rules(conn: Connection) -> set[str]:
    """The accounts for which ``pending_for_rules`` finds a message."""
    query = (
        select(folders.c.account).join(messages, folders.c.id == messages.c.folder_id).where(_RULES_PENDING)
    )
    return set(conn.execute(query.distinct()).scalars())


@dataclass(frozen=True)
class MessageOrigin:
    """Where an indexed message came from, and when its row was committed."""

    account: str
    folder: str
    uidvalidity: int
    uid: int
    indexed_at: datetime


def message_origin(conn: Connection, pk: int) -> MessageOrigin | None:
    row = conn.execute(
        select(
            folders.c.account, folders.c.name, messages.c.uidvalidity, messages.c.uid, messages.c.indexed_at
        )
        .join(folders, folders.c.id == messages.c.folder_id)
        .where(messages.c.id == pk)
    ).first()
    if row is None:
        return None
    account, folder, uidvalidity, uid, indexed_at = row
    return MessageOrigin(account, folder, int(uidvalidity), int(uid), indexed_at)


@dataclass(frozen=True)
class StoredMessage:
    """An indexed message as the rules see it (rebuilt from its row, so a restart loses nothing)."""

    pk: int
    folder: str
    uidvalidity: int
    uid: int
    flags: tuple[str, ...]
    rules_state: str
    parsed: ParsedMessage


def load_message(conn: Connection, pk: int) -> StoredMessage | None:
    row = (
        conn.execute(
            select(messages, folders.c.name.label("folder_name"))
            .join(folders, folders.c.id == messages.c.folder_id)
            .where(messages.c.id == pk)
        )
        .mappings()
        .first()
    )
    if row is None:
        return None
    attachment_rows = conn.execute(
        select(attachments.c.filename, attachments.c.content_type, attachments.c.size).where(
            attachments.c.message_pk == pk
        )
    ).all()
    headers = HeaderBlock(row["header_block"])
    lists: Mapping[str, list[list[str]]] = row["address_lists"]

    def addresses(field: str) -> tuple[Address, ...]:
        return tuple(Address(name, email) for name, email in lists.get(field, ()))

    parsed = ParsedMessage(
        message_id=row["message_id"],
        subject=row["subject"],
        from_=addresses("from"),
        to=addresses("to"),
        cc=addresses("cc"),
        reply_to=addresses("reply-to"),
        date=row["date"],
        in_reply_to=row["in_reply_to"],
        references=tuple(row["references"].split()),
        list_id=row["list_id"],
        auto_submitted=row["auto_submitted"],
        return_path=_return_path(headers),
        headers=headers,
        body_text=row["body_text"],
        attachments=tuple(Attachment(*a) for a in attachment_rows),
        size=row["size"],
        thread_key=row["thread_key"],
        truncated=row["truncated"],
        problems=tuple(row["problems"].split()),
    )
    return StoredMessage(
        pk=pk,
        folder=row["folder_name"],
        uidvalidity=row["uidvalidity"],
        uid=row["uid"],
        flags=tuple(row["flags"].split()),
        rules_state=row["rules_state"],
        parsed=parsed,
    )


def _return_path(headers: Mapping[str, tuple[str, ...]]) -> str | None:
    values = headers.get("return-path")
    if not values:
        return None
    return values[0].strip().strip("<>").strip()


@dataclass(frozen=True)
class FolderStats:
    name: str
    uidvalidity: int | None
    messages: int
    expunged: int
    last_sync: datetime | None


def folder_counts() -> tuple[ScalarSelect[int], ScalarSelect[int]]:
    """Two counts of the ``folders`` row a statement selects, each read from an index alone: all
    its messages (the unique key) and the expunged ones (a partial index of those few); its live
    messages are the difference. Counting live rows instead read every message row."""
    in_folder = and_(messages.c.folder_id == folders.c.id, messages.c.uidvalidity == folders.c.uidvalidity)
    total = select(func.count()).select_from(messages).where(in_folder).scalar_subquery()
    expunged = (
        select(func.count())
        .select_from(messages)
        .where(in_folder, messages.c.expunged_at.is_not(None))
        .scalar_subquery()
    )
    return total, expunged


def folder_stats(conn: Connection, account: str) -> list[FolderStats]:
    total, expunged = folder_counts()
    rows = conn.execute(
        select(folders.c.name, folders.c.uidvalidity, total, expunged, folders.c.last_sync_at)
        .where(folders.c.account == account)
        .order_by(folders.c.name)
    ).all()
    return [
        FolderStats(
            name=name,
            uidvalidity=uidvalidity,
            messages=int(total) - int(expunged),
            expunged=int(expunged),
            last_sync=last_sync,
        )
        for name, uidvalidity, total, expunged, last_sync in rows
    ]
