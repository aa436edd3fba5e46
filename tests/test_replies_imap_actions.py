"""Mailbox actions against real servers (Dovecot and Cyrus): flag, seen, move (MOVE and the COPY
fallback), appends, and none on a UID whose folder was recreated since the message was indexed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from imapclient import DELETED, DRAFT, FLAGGED, SEEN
from structlog.testing import capture_logs

from emailops.config import ReplyConfig
from emailops.imap.announcements import CHANGE_ANSWERS
from emailops.imap.imaplib_internals import set_aside_answers
from emailops.pipeline import MailPipeline
from emailops.processes import ProcessIdentity
from emailops.replies import appends, imap_actions
from emailops.replies.appends import AppendOutcome
from emailops.replies.decisions import MailboxAction, MailboxActionKind
from emailops.replies.mailbox import FolderRecreated, MailboxSession
from emailops.replies.stages import RulesStage
from localmail.dovecot import LocalDovecot
from localmail.imap_server import LocalImapServer
from tests.conftest import MAIL_USERS
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, rows, sync_config

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
        session = MailboxSession(imap_config(dovecot))
        assert appends.save_draft(session, RAW, "<x@y>", folder="Drafts").outcome is AppendOutcome.SAVED
        assert appends.save_sent_copy(session, RAW, "<x@y>", folder="Sent").outcome is AppendOutcome.SAVED
        # A draft already in the folder is not saved again.
        assert appends.save_draft(session, RAW, "<x@y>", folder="Drafts").outcome is AppendOutcome.FOUND
        session.close()
        with dovecot.imap(USER) as client:
            client.select_folder("Drafts", readonly=True)
            (draft,) = client.search(["ALL"])
            assert {DRAFT, SEEN} <= set(client.get_flags([draft])[draft])
            client.select_folder("Sent", readonly=True)
            (sent,) = client.search(["ALL"])
            assert SEEN in client.get_flags([sent])[sent] and DRAFT not in client.get_flags([sent])[sent]


def test_a_draft_refused_by_the_server_is_not_saved_and_may_be_tried_again(dovecot: LocalDovecot) -> None:
    session = MailboxSession(imap_config(dovecot))
    # No such folder: the SELECT before the APPEND is refused.
    refused = appends.save_draft(session, RAW, "<x@y>", folder="Drafts")
    assert refused.outcome is AppendOutcome.NOT_SAVED and refused.error
    copy = appends.save_sent_copy(session, RAW, "<x@y>", folder="Sent")
    assert copy.outcome is AppendOutcome.NOT_SAVED and "TRYCREATE" in (copy.error or "")
    session.close()


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


MOVE_RULE = """
[[rules]]
name = "file-invoices"
folders = ["Work"]
[rules.match]
subject = "invoice"
[rules.actions]
flag = true
move = "Archive"
"""


def work_message(subject: str, n: int) -> bytes:
    return (
        f"From: bob@example.test\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <work-{n}@example.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def test_a_rule_action_does_not_touch_the_message_that_took_the_uid_in_a_recreated_folder(
    imap_server: LocalImapServer, db_url: str, tmp_path: Path
) -> None:
    # The message is indexed under one UIDVALIDITY; before its rules run, the folder is deleted and
    # created again and another message gets the same UID. The rule's flag and move must not hit it.
    imap_server.create_folder(ALICE, "Work")
    imap_server.create_folder(ALICE, "Archive")
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(MOVE_RULE)
    engine = index_engine(db_url)
    config = ReplyConfig(from_address=ALICE, own_addresses=(ALICE,), rules_file=rules_file)
    imap = imap_config(imap_server)
    indexing = MailPipeline(
        engine, imap, sync_config(folders=("Work",)), owner=str(ProcessIdentity.of_this_process(1, run="t"))
    )
    stage = RulesStage(engine, account=ACCOUNT, config=config, mailbox=MailboxSession(imap))

    def index_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, "not indexed in time"
            indexing.run_once()

    try:
        index_until(lambda: any(w.idling for w in indexing.watchers.values()))
        old_uid = imap_server.append(ALICE, "Work", work_message("invoice 1", 1))
        index_until(lambda: rows(engine, "SELECT rules_state FROM messages") == [("pending",)])
        (indexed_under,) = rows(engine, "SELECT uidvalidity FROM messages")
        imap_server.delete_folder(ALICE, "Work")
        imap_server.create_folder(ALICE, "Work")
        other_uid = imap_server.append(ALICE, "Work", work_message("lunch", 2))
        assert other_uid == old_uid
        assert imap_server.folder_status(ALICE, "Work")["uidvalidity"] != indexed_under[0]

        with capture_logs() as logs:
            assert stage.run_once()
        with imap_server.imap(ALICE) as client:
            client.select_folder("Work", readonly=True)
            assert client.search(["ALL"]) == [other_uid]
            assert FLAGGED not in client.get_flags([other_uid])[other_uid]
            client.select_folder("Archive", readonly=True)
            assert client.search(["ALL"]) == []
        (skipped,) = [e for e in logs if e["event"].startswith("mailbox change asked by a rule not made")]
        assert skipped["uid"] == old_uid and skipped["uidvalidity"] == indexed_under[0]
        assert skipped["folder_uidvalidity"] == imap_server.folder_status(ALICE, "Work")["uidvalidity"]
        assert skipped["actions"] == ["flag", "move"] and skipped["log_level"] == "warning"

        # Once the index has the folder's new UIDVALIDITY, a message that arrives is filed as the
        # rule says (the resync itself indexes what is there as history: not for the rules).
        current = imap_server.folder_status(ALICE, "Work")["uidvalidity"]
        index_until(lambda: rows(engine, "SELECT uidvalidity FROM folders") == [(current,)])
        new_uid = imap_server.append(ALICE, "Work", work_message("invoice 3", 3))
        index_until(lambda: ("pending",) in rows(engine, "SELECT rules_state FROM messages"))
        assert stage.run_once()
        with imap_server.imap(ALICE) as client:
            client.select_folder("Work", readonly=True)
            assert client.search(["ALL"]) == [other_uid] and new_uid != other_uid
            client.select_folder("Archive", readonly=True)
            (filed,) = client.search(["ALL"])
            assert FLAGGED in client.get_flags([filed])[filed]
    finally:
        stage.close()
        indexing.close()


def test_a_selection_made_before_the_folder_was_recreated_is_not_trusted(
    imap_server: LocalImapServer,
) -> None:
    # The session selected the folder, then it was recreated: the UIDVALIDITY checked is the one a
    # new SELECT reports, for UIDs of the old folder and of the new one alike.
    imap_server.create_folder(ALICE, "Work")
    imap_server.append(ALICE, "Work", work_message("invoice 1", 1))
    old = imap_server.folder_status(ALICE, "Work")["uidvalidity"]
    session = MailboxSession(imap_config(imap_server))
    session.client_for_uids("Work", old)
    imap_server.delete_folder(ALICE, "Work")
    imap_server.create_folder(ALICE, "Work")
    uid = imap_server.append(ALICE, "Work", work_message("invoice 2", 2))
    new = imap_server.folder_status(ALICE, "Work")["uidvalidity"]
    with pytest.raises(FolderRecreated) as raised:
        session.client_for_uids("Work", old)
    assert (raised.value.expected, raised.value.current) == (old, new)
    imap_actions.add_flags(session.client_for_uids("Work", new), uid)
    session.close()
    with imap_server.imap(ALICE) as client:
        client.select_folder("Work", readonly=True)
        assert FLAGGED in client.get_flags([uid])[uid]
