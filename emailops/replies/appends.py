"""Drafts and Sent copies (IMAP APPEND) saved at most once, even when the answer to an APPEND is lost.

A server acts on an APPEND before it answers, so an APPEND whose answer never came (timeout, dropped
connection) may have saved the message: its outcome is unknown, not a failure to try again. The
folder is then searched, over a new connection, for the message's Message-ID (ours are unique per
reply): found, it counts as saved; not found, it stays unknown (the server may still be saving it).
A draft is searched for before every APPEND, so no later attempt (the operator's ``outbox retry``,
or a row made pending again by a restored backup) saves it twice.

When the account has no IMAP connection slot free (``ImapNoConnectionSlotError``) before anything
was sent, the outcome is ``NO_SLOT``: the caller tries again later, and counts no failure. After a
lost answer, a search that finds no slot leaves the outcome unknown, as any failed search does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from imaplib import IMAP4

from imapclient import DRAFT, SEEN
from imapclient.exceptions import IMAPClientError

from emailops.imap.errors import CONNECTION_ERRORS, ImapError, ImapNoConnectionSlotError
from emailops.replies.mailbox import MailboxSession

# A command's answer was lost: the connection broke (or the server said BYE) while we waited for it.
_ANSWER_LOST = (OSError, EOFError, IMAP4.abort)


class AppendOutcome(StrEnum):
    SAVED = "saved"  # the server answered OK
    FOUND = "found"  # already in the folder: an earlier APPEND whose answer was lost saved it
    NOT_SAVED = "not_saved"  # refused by the server, or nothing sent: may be tried again
    UNKNOWN = "unknown"  # the answer was lost and the folder does not (yet) show the message
    NO_SLOT = "no_slot"  # nothing sent: the account's IMAP connections were all in use


@dataclass(frozen=True)
class AppendResult:
    outcome: AppendOutcome
    error: str | None = None

    @property
    def saved(self) -> bool:
        return self.outcome in (AppendOutcome.SAVED, AppendOutcome.FOUND)


def save_draft(session: MailboxSession, raw: bytes, message_id: str, *, folder: str) -> AppendResult:
    """Append a draft (``\\Draft \\Seen``) unless ``folder`` already has ``message_id``."""
    try:
        if _in_folder(session, folder, message_id):
            return AppendResult(AppendOutcome.FOUND)
    except ImapNoConnectionSlotError as exc:
        return AppendResult(AppendOutcome.NO_SLOT, str(exc))
    except (ImapError, *CONNECTION_ERRORS) as exc:
        session.drop()
        return AppendResult(AppendOutcome.NOT_SAVED, f"searching {folder} before saving failed: {exc}")
    return _append(session, raw, message_id, folder=folder, flags=(DRAFT, SEEN))


def save_sent_copy(session: MailboxSession, raw: bytes, message_id: str, *, folder: str) -> AppendResult:
    """Append a copy of a sent reply (``\\Seen``). Sent folders are large and a copy is tried once,
    so the folder is searched only when the answer was lost."""
    return _append(session, raw, message_id, folder=folder, flags=(SEEN,))


def _in_folder(session: MailboxSession, folder: str, message_id: str) -> bool:
    client = session.client(folder)
    return bool(client.search(["HEADER", "Message-ID", message_id]))


def _append(
    session: MailboxSession, raw: bytes, message_id: str, *, folder: str, flags: tuple[bytes, ...]
) -> AppendResult:
    try:
        client = session.client()
    except ImapNoConnectionSlotError as exc:
        return AppendResult(AppendOutcome.NO_SLOT, str(exc))
    except (ImapError, *CONNECTION_ERRORS) as exc:
        session.drop()
        return AppendResult(AppendOutcome.NOT_SAVED, str(exc))
    try:
        client.append(folder, raw, flags=flags)
    except _ANSWER_LOST as exc:
        session.drop()
        return _after_lost_answer(session, folder, message_id, f"{type(exc).__name__}: {exc}")
    except IMAPClientError as exc:  # a NO or BAD answer: the server refused it
        return AppendResult(AppendOutcome.NOT_SAVED, str(exc))
    return AppendResult(AppendOutcome.SAVED)


def _after_lost_answer(session: MailboxSession, folder: str, message_id: str, lost: str) -> AppendResult:
    try:
        if _in_folder(session, folder, message_id):
            return AppendResult(AppendOutcome.FOUND, f"the answer to APPEND was lost ({lost})")
    except (ImapError, *CONNECTION_ERRORS) as exc:
        session.drop()
        return AppendResult(
            AppendOutcome.UNKNOWN,
            f"the answer to APPEND was lost ({lost}) and searching {folder} for it failed: {exc}",
        )
    return AppendResult(
        AppendOutcome.UNKNOWN, f"the answer to APPEND was lost ({lost}) and {folder} does not show it yet"
    )
