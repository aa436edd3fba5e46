"""Mailbox changes rules ask for, made with an ``imapclient.IMAPClient`` after the database commit.

The functions expect the message's folder to be selected read-write (``MailboxSession.client_for_uids``,
which checks the folder's UIDVALIDITY) and address the message by UID. Drafts and Sent copies are
saved by ``appends``.
"""

from __future__ import annotations

from collections.abc import Iterable

from imapclient import DELETED, FLAGGED, SEEN, IMAPClient

from emailops.replies.decisions import MailboxAction, MailboxActionKind


def add_flags(client: IMAPClient, uid: int, flags: Iterable[bytes | str] = (FLAGGED,)) -> None:
    client.add_flags([uid], list(flags), silent=True)


def mark_seen(client: IMAPClient, uid: int) -> None:
    client.add_flags([uid], [SEEN], silent=True)


def move(client: IMAPClient, uid: int, folder: str) -> None:
    """MOVE (RFC 6851) when the server has it, else COPY, STORE \\Deleted and UID EXPUNGE of that UID
    only (RFC 4315), so other messages marked deleted are left alone."""
    if client.has_capability("MOVE"):
        client.move([uid], folder)
        return
    client.copy([uid], folder)
    client.add_flags([uid], [DELETED], silent=True)
    if client.has_capability("UIDPLUS"):
        client.uid_expunge([uid])
    # Without UIDPLUS the message stays marked \Deleted: a plain EXPUNGE would also remove other
    # messages that someone else marked deleted.


def perform(client: IMAPClient, uid: int, actions: Iterable[MailboxAction]) -> None:
    """Apply ``decisions.mailbox_actions(...)`` to one message, in order (a move comes last)."""
    for action in actions:
        if action.kind is MailboxActionKind.FLAG:
            add_flags(client, uid)
        elif action.kind is MailboxActionKind.MARK_SEEN:
            mark_seen(client, uid)
        elif action.kind is MailboxActionKind.MOVE and action.folder:
            move(client, uid, action.folder)
