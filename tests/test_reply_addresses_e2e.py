"""Addresses with commas in their names, through the real daemon path and through ``rules test``.

A directory that writes names as "Last, First" gives To: "Doe, John" <alice@...> and an encoded
Reply-To whose decoded name holds a comma. The reply must go to the Reply-To address, its
``{to}`` must be the first To address, and ``emailops rules test`` must print the same reply.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path

import pytest

from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from tests.conftest import MAIL_USERS
from tests.index_helpers import ALICE, daemon_env
from tests.test_replies_e2e import Daemon

REPO = Path(__file__).resolve().parents[1]
HANS = "hans@example.org"
SENDER = "sender@example.net"
USERS = {**MAIL_USERS, HANS: "hans-pw", SENDER: "sender-pw"}
RULES = """
[[rules]]
name = "corrmark"
[rules.match]
subject = "corrmark"
[rules.reply]
template = \"\"\"Hello {sender_name},
To: {to}\"\"\"
"""
INBOUND = (
    f"From: Sender <{SENDER}>\r\n"
    f"Reply-To: =?utf-8?q?M=C3=BCller=2C_Hans?= <{HANS}>\r\n"
    f'To: "Doe, John" <{ALICE}>, other@example.com\r\n'
    "Subject: corrmark 1\r\n"
    "Message-ID: <corrmark-1@example.net>\r\n"
    "Date: Tue, 2 Jan 2024 10:00:00 +0000\r\n"
    "\r\n"
    "Who answers this?\r\n"
).encode()


@pytest.fixture
def dovecot() -> Iterator[LocalDovecot]:
    """Alice's server, with mailboxes for the Reply-To and the From address of the message."""
    with LocalDovecot(USERS) as server:
        yield server


@pytest.fixture
def smtp_relay(dovecot: LocalDovecot) -> Iterator[LocalSmtpRelay]:
    with LocalSmtpRelay(dovecot, USERS) as relay:
        yield relay


def inbox(dovecot: LocalDovecot, user: str) -> list[EmailMessage]:
    with dovecot.imap(user) as client:
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]"]).values()
        return [message_from_bytes(d[b"BODY[]"], _class=EmailMessage, policy=policy.default) for d in fetched]


def rules_test(env: dict[str, str], eml: Path) -> EmailMessage:
    """The reply ``emailops rules test --json`` shows for ``eml`` (it must show exactly one)."""
    done = subprocess.run(
        [sys.executable, "-m", "emailops", "rules", "test", "--json", str(eml)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [outcome] = json.loads(done.stdout)
    assert outcome["verdict"] == "would reply", outcome
    return message_from_bytes(outcome["reply"].encode(), _class=EmailMessage, policy=policy.default)


def body(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return "\n".join(line.rstrip() for line in str(part.get_content()).strip().splitlines())


def test_reply_to_a_name_with_a_comma_goes_where_rules_test_says(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, db_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES)
    daemon = Daemon(dovecot, smtp_relay, db_url, rules_file)
    try:
        # Asked first, on the same index: once the daemon has answered, the trial would say so.
        eml = tmp_path / "corrmark.eml"
        eml.write_bytes(INBOUND)
        env = daemon_env(dovecot, tmp_path, INDEX_DB_URL=db_url, RULES_FILE=str(rules_file))
        predicted = rules_test(env, eml)

        daemon.run_until(daemon.watching)
        dovecot.deliver(ALICE, INBOUND, mail_from=SENDER)
        daemon.run_until(lambda: len(smtp_relay.accepted) == 1, timeout=30)
    finally:
        daemon.close()

    # The relay hands a message to Dovecot (LMTP) before it answers 250: it is in the mailbox now.
    assert smtp_relay.accepted[0].rcpt_tos == (HANS,)
    assert smtp_relay.accepted[0].delivered_to == (HANS,)
    assert inbox(dovecot, SENDER) == []
    (sent,) = inbox(dovecot, HANS)
    assert parseaddr(str(sent["To"]))[1] == HANS
    assert sent["To"].addresses[0].display_name == "Müller, Hans"
    assert body(sent) == f"Hello Sender,\nTo: {ALICE}"
    assert daemon.outbox() == [("corrmark", "sent", HANS, None)]

    # rules test predicted this very reply: recipient, subject, threading and text.
    for header in ("To", "From", "Subject", "Message-ID", "In-Reply-To", "References"):
        assert str(predicted[header]) == str(sent[header]), header
    assert body(predicted) == body(sent)
