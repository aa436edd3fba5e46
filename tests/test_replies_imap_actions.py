"""Mailbox actions against real servers: flag, seen, move (MOVE and the COPY fallback), appends."""

from __future__ import annotations

import pytest
from imapclient import DELETED, DRAFT, FLAGGED, SEEN

from emailops.imap.announcements import CHANGE_ANSWERS
from emailops.imap.imaplib_internals import set_aside_answers
from emailops.replies import imap_actions
from emailops.replies.decisions import MailboxAction, MailboxActionKind
from emailops.replies.mailbox import MailboxSession
from localmail.dovecot import LocalDovecot
from localmail.imap_server import LocalImapServer
from tests.conftest import MAIL_USERS
from tests.index_helpers import ALICE, imap_config

USER = "alice@example.test"
RAW = b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: hi\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"


@pytest.mark.parametrize("removed", [(), ("MOVE",)])
def test_flag_seen_move(removed: tuple[str, ...]) -> None:
    with LocalDovecot(MAIL_USERS, capabilities_removed=removed) as dovecot:
        dovecot.create_folder(USER, "Archive")
        keep = dovecot.append(USER, "INBOX", RAW, flags=[r"\Deleted"])  # someone else's pending delete
        uid = dovecot.append(USER, "INBOX", RAW)
        with dovecot.imap(USER) as client:
            client.select_folder("INBOX")
            assert client.has_capability("MOVE") is (not removed)
            imap_actions.perform(
                client,
                uid,
                [
                    MailboxAction(MailboxActionKind.FLAG),
                    MailboxAction(MailboxActionKind.MARK_SEEN),
                    MailboxAction(MailboxActionKind.MOVE, "Archive"),
                ],
            )
            assert client.search(["ALL"]) == [keep]  # only our message left; the other is untouched
            assert DELETED in client.get_flags([keep])[keep]
            client.select_folder("Archive")
            (moved,) = client.search(["ALL"])
            assert {FLAGGED, SEEN} <= set(client.get_flags([moved])[moved])


def test_append_draft_and_sent() -> None:
    with LocalDovecot(MAIL_USERS) as dovecot:
        dovecot.create_folder(USER, "Drafts")
        dovecot.create_folder(USER, "Sent")
        with dovecot.imap(USER) as client:
            imap_actions.append_draft(client, RAW, folder="Drafts")
            imap_actions.append_sent(client, RAW, folder="Sent")
            client.select_folder("Drafts", readonly=True)
            (draft,) = client.search(["ALL"])
            assert {DRAFT, SEEN} <= set(client.get_flags([draft])[draft])
            client.select_folder("Sent", readonly=True)
            (sent,) = client.search(["ALL"])
            assert SEEN in client.get_flags([sent])[sent] and DRAFT not in client.get_flags([sent])[sent]


def test_a_session_closed_by_the_server_while_idle_is_reopened_before_use(
    imap_server: LocalImapServer,
) -> None:
    # Servers close connections left idle (Dovecot after 30 minutes, NAT tables sooner): the
    # first rule action after a quiet spell must not be the one that finds out and is lost.
    uid = imap_server.append(ALICE, "INBOX", RAW)
    now = [0.0]
    session = MailboxSession(imap_config(imap_server), monotonic=lambda: now[0])
    session.client("INBOX")
    assert imap_server.kill_imap_connections(ALICE) == 1
    now[0] += MailboxSession.IDLE_CHECK_SECONDS + 1
    imap_actions.perform(session.client("INBOX"), uid, [MailboxAction(MailboxActionKind.FLAG)])
    with imap_server.imap(ALICE) as client:
        client.select_folder("INBOX")
        assert FLAGGED in client.get_flags([uid])[uid]
    session.close()


def test_a_long_lived_session_keeps_no_announcement_of_the_mail_that_arrives(
    imap_server: LocalImapServer,
) -> None:
    # The session lives as long as the worker, and each use NOOPs into a folder where mail keeps
    # arriving: imaplib set the EXISTS and RECENT answers aside, two more per message, for ever.
    session = MailboxSession(imap_config(imap_server))
    session.client("INBOX")
    for n in range(20):
        imap_server.deliver(ALICE, RAW.replace(b"<x@y>", f"<x{n}@y>".encode()))
        client = session.client("INBOX")
        (uid,) = client.search(["HEADER", "Message-ID", f"<x{n}@y>"])
        imap_actions.add_flags(client, uid)
        # The NOOP made the new message known to the session: the STORE took effect.
        assert FLAGGED in client.get_flags([uid])[uid]
    kept = set_aside_answers(session.client("INBOX"))
    assert {kind: kept[kind] for kind in CHANGE_ANSWERS if kind in kept} == {}
    session.close()
