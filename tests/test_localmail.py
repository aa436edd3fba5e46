"""The test harness itself: real Dovecot, real SMTP relay, real databases."""

from __future__ import annotations

import imaplib
import os
import smtplib
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import imapclient
import pytest
import sqlalchemy as sa

from localmail import dovecot as dovecot_module
from localmail.dovecot import DovecotError, LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay

ALICE = "alice@example.test"
BOB = "bob@example.test"


def message(subject: str, body: str = "Hello.", to: str = ALICE) -> bytes:
    return (
        f"From: Carol <carol@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\n\r\n{body}\r\n"
    ).encode()


def subjects(server: LocalDovecot, user: str, folder: str = "INBOX") -> list[str]:
    with server.imap(user) as client:
        client.select_folder(folder, readonly=True)
        fetched = client.fetch(client.search("ALL"), [b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
    headers = [fetched[uid][b"BODY[HEADER.FIELDS (SUBJECT)]"] for uid in sorted(fetched)]
    return [header.decode().removeprefix("Subject: ").strip() for header in headers]


# ------------------------------------------------------------------------------------ Dovecot


def test_login_with_domain_username_over_plain_port(dovecot: LocalDovecot) -> None:
    client = imapclient.IMAPClient(dovecot.host, dovecot.imap_port, ssl=False, timeout=10)
    assert b"STARTTLS" not in client.capabilities()
    client.login(BOB, "bob-pw")
    assert client.select_folder("INBOX")[b"EXISTS"] == 0
    client.logout()

    refused = imapclient.IMAPClient(dovecot.host, dovecot.imap_port, ssl=False, timeout=10)
    with pytest.raises(imapclient.exceptions.LoginError):
        refused.login(ALICE, "wrong-password")


def test_starttls_and_imaps_verify_against_the_test_ca(dovecot_tls: LocalDovecot) -> None:
    assert dovecot_tls.ca_file is not None and dovecot_tls.imaps_port is not None
    context = ssl.create_default_context(cafile=str(dovecot_tls.ca_file))

    plain = imapclient.IMAPClient(dovecot_tls.host, dovecot_tls.imap_port, ssl=False, timeout=10)
    assert b"STARTTLS" in plain.capabilities()
    plain.starttls(context)
    plain.login(ALICE, "alice-pw")
    assert plain.folder_exists("INBOX")
    plain.logout()

    implicit = imapclient.IMAPClient(
        dovecot_tls.imaps_host, dovecot_tls.imaps_port, ssl=True, ssl_context=context, timeout=10
    )
    implicit.login(ALICE, "alice-pw")
    implicit.logout()

    # The certificate is not trusted without the test CA: verification really happens.
    with pytest.raises(ssl.SSLCertVerificationError):
        imapclient.IMAPClient(
            dovecot_tls.host, dovecot_tls.imaps_port, ssl=True, ssl_context=ssl.create_default_context()
        )


def test_starttls_can_be_withheld_while_imaps_works() -> None:
    with LocalDovecot({ALICE: "alice-pw"}, tls=True, starttls_offered=False) as server:
        assert server.ca_file is not None and server.imaps_port is not None
        plain = imapclient.IMAPClient(server.host, server.imap_port, ssl=False, timeout=10)
        assert b"STARTTLS" not in plain.capabilities()
        with pytest.raises(imaplib.IMAP4.error):
            plain.starttls(ssl.create_default_context(cafile=str(server.ca_file)))
        context = ssl.create_default_context(cafile=str(server.ca_file))
        implicit = imapclient.IMAPClient(
            server.imaps_host, server.imaps_port, ssl=True, ssl_context=context, timeout=10
        )
        implicit.login(ALICE, "alice-pw")
        implicit.logout()


def test_lmtp_delivery_lands_in_inbox(dovecot: LocalDovecot) -> None:
    dovecot.deliver(BOB, message("first", to=BOB))
    dovecot.deliver([ALICE, BOB], message("second"))

    assert subjects(dovecot, BOB) == ["first", "second"]
    assert subjects(dovecot, ALICE) == ["second"]
    with dovecot.imap(BOB) as client:
        client.select_folder("INBOX", readonly=True)
        assert client.search(["UNSEEN"]) == [1, 2]
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        dovecot.deliver("nobody@example.test", message("lost"))


def test_capabilities_can_be_hidden() -> None:
    hidden = {"IDLE", "CONDSTORE", "QRESYNC"}
    with (
        LocalDovecot({ALICE: "alice-pw"}, capabilities_removed=hidden) as server,
        server.imap(ALICE) as client,
    ):
        capabilities = {name.decode().upper() for name in client.capabilities()}
        assert not capabilities & hidden
        assert {"IMAP4REV1", "UIDPLUS", "MOVE", "LITERAL+"} <= capabilities
        assert not client.has_capability("IDLE")
    with pytest.raises(ValueError, match="unknown IMAP capabilities"):
        LocalDovecot({ALICE: "alice-pw"}, capabilities_removed={"IDEL"})


def test_restart_keeps_ports_mail_and_uidvalidity(dovecot: LocalDovecot) -> None:
    dovecot.deliver(ALICE, message("kept"))
    before = dovecot.folder_status(ALICE)
    ports = (dovecot.imap_port, dovecot.lmtp_port)
    with dovecot.imap(ALICE) as client:
        client.select_folder("INBOX")
        dovecot.restart()
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            client.noop()

    assert (dovecot.imap_port, dovecot.lmtp_port) == ports
    assert dovecot.folder_status(ALICE) == before
    assert subjects(dovecot, ALICE) == ["kept"]


def test_kill_drops_only_the_chosen_users_connections(dovecot: LocalDovecot) -> None:
    dovecot.bulk_load(ALICE, "INBOX", [message(f"m{i}", body="x" * 200_000) for i in range(20)])
    with dovecot.imap(ALICE) as alice, dovecot.imap(BOB) as bob:
        alice.select_folder("INBOX")
        bob.select_folder("INBOX")
        assert len(dovecot.imap_process_ids(ALICE)) == 1

        assert dovecot.kill_imap_connections(ALICE) == 1
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            alice.fetch([1], [b"BODY.PEEK[]"])
        assert bob.noop()[0] is not None
    assert dovecot.imap_process_ids(ALICE) == []


def test_append_with_flags_and_internaldate(dovecot: LocalDovecot) -> None:
    received = datetime(2024, 2, 29, 12, 30, tzinfo=UTC)
    uid = dovecot.append(
        ALICE, "INBOX", message("appended"), flags=[r"\Seen", "$Important"], internaldate=received
    )
    assert uid == 1
    with dovecot.imap(ALICE) as client:
        client.select_folder("INBOX", readonly=True)
        data = client.fetch([uid], [b"FLAGS", b"INTERNALDATE"])[uid]
    assert {b"\\Seen", b"$Important"} <= set(data[b"FLAGS"])
    assert data[b"INTERNALDATE"].astimezone(UTC) == received


def test_recreated_folder_gets_new_uidvalidity(dovecot: LocalDovecot) -> None:
    dovecot.create_folder(ALICE, "Projects")
    dovecot.append(ALICE, "Projects", message("old"))
    first = dovecot.folder_status(ALICE, "Projects")
    dovecot.delete_folder(ALICE, "Projects")
    dovecot.create_folder(ALICE, "Projects")
    second = dovecot.folder_status(ALICE, "Projects")
    assert second["uidvalidity"] != first["uidvalidity"]
    assert (second["messages"], second["uidnext"]) == (0, 1)


def test_doveadm_runs_against_this_instance(dovecot: LocalDovecot) -> None:
    dovecot.deliver(ALICE, message("counted"))
    result = dovecot.doveadm("mailbox", "status", "-u", ALICE, "messages", "INBOX")
    assert result.stdout.split() == ["INBOX", "messages=1"]


def test_bulk_load_10000_messages_in_order(dovecot: LocalDovecot) -> None:
    count = 10_000
    started = time.monotonic()
    written = dovecot.bulk_load(
        ALICE, "Archive", (message(f"bulk {i}") for i in range(count)), flags=[r"\Seen"]
    )
    with dovecot.imap(ALICE) as client:
        assert client.select_folder("Archive", readonly=True)[b"EXISTS"] == count
        visible = time.monotonic() - started
        edges = client.fetch([1, count], [b"FLAGS", b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
        assert client.search(["UNSEEN"]) == []
    assert written == count
    assert edges[1][b"BODY[HEADER.FIELDS (SUBJECT)]"].strip() == b"Subject: bulk 0"
    assert edges[count][b"BODY[HEADER.FIELDS (SUBJECT)]"].strip() == b"Subject: bulk 9999"
    assert b"\\Seen" in edges[1][b"FLAGS"]
    assert visible < 30  # generous: a few seconds here (bench/ measures the loader)


def test_clear_errors_for_missing_binaries_and_unreachable_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # pytest's tmp_path is private to root (0700), so the dovecot user could not reach homes in it.
    with pytest.raises(DovecotError, match="not searchable by the 'dovecot' user"):
        LocalDovecot({ALICE: "alice-pw"}, work_dir=tmp_path / "mail")
    monkeypatch.setattr(dovecot_module, "DOVECOT_BINARY", "dovecot-not-installed")
    with pytest.raises(DovecotError, match="dovecot-imapd"):
        LocalDovecot({ALICE: "alice-pw"})


def test_start_failure_reports_dovecots_own_error() -> None:
    server = LocalDovecot({ALICE: "alice-pw"})
    try:
        server.config_file.write_text(server.config_file.read_text() + "no_such_setting = 1\n")
        with pytest.raises(DovecotError, match="no_such_setting"):
            server.start()
        assert not server.running
    finally:
        server.close()
    assert not server.work_dir.exists()


def test_instances_of_killed_processes_are_cleaned_up() -> None:
    program = (
        "import sys\n"
        "from localmail.dovecot import LocalDovecot\n"
        "server = LocalDovecot({'alice@example.test': 'alice-pw'})\n"
        "server.start()\n"
        "print(server.work_dir, flush=True)\n"
        "sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        orphan_dir = Path(owner.stdout.readline().strip())
        master_pid = int((orphan_dir / "run" / "master.pid").read_text())
    finally:
        owner.kill()
        owner.wait()
    assert orphan_dir.is_dir()  # the owner died without close(): master and folder are left

    with LocalDovecot({ALICE: "alice-pw"}):
        assert not orphan_dir.exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(500):
            os.kill(master_pid, 0)
            time.sleep(0.01)


# ------------------------------------------------------------------------------------ SMTP relay


def test_relay_delivers_into_the_mailbox_and_records(
    smtp_relay: LocalSmtpRelay, dovecot: LocalDovecot
) -> None:
    with smtplib.SMTP(smtp_relay.host, smtp_relay.port, timeout=10) as client:
        client.login(ALICE, "alice-pw")
        client.sendmail(ALICE, [BOB, "carol@example.org"], message("Re: hello", to=BOB))

    [accepted] = smtp_relay.accepted
    assert accepted.mail_from == ALICE
    assert accepted.rcpt_tos == (BOB, "carol@example.org")
    assert accepted.delivered_to == (BOB,)
    assert accepted.auth_login == ALICE
    assert b"Subject: Re: hello" in accepted.data
    assert subjects(dovecot, BOB) == ["Re: hello"]


def test_relay_requires_auth_and_checks_passwords(smtp_relay: LocalSmtpRelay) -> None:
    with smtplib.SMTP(smtp_relay.host, smtp_relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(ALICE, [BOB], message("anonymous"))
        assert refused.value.smtp_code == 530
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(ALICE, "bob-pw")
    assert smtp_relay.accepted == []


def test_relay_injects_transient_and_permanent_failures(smtp_relay: LocalSmtpRelay) -> None:
    with smtplib.SMTP(smtp_relay.host, smtp_relay.port, timeout=10) as client:
        client.login(ALICE, "alice-pw")
        smtp_relay.fail_next(451, "4.3.0 Try again later", times=2)
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError) as transient:
                client.sendmail(ALICE, [BOB], message("retry me"))
            assert transient.value.smtp_code == 451
        smtp_relay.fail_next(550, "5.1.1 No such mailbox", at="RCPT")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as permanent:
            client.sendmail(ALICE, [BOB], message("refused"))
        assert permanent.value.recipients[BOB][0] == 550
        client.sendmail(ALICE, [BOB], message("finally"))

    assert [(r.stage, r.code) for r in smtp_relay.rejected] == [("DATA", 451), ("DATA", 451), ("RCPT", 550)]
    assert [m.rcpt_tos for m in smtp_relay.accepted] == [(BOB,)]


def test_relay_down_then_up_on_the_same_port(smtp_relay: LocalSmtpRelay) -> None:
    port = smtp_relay.port
    smtp_relay.stop()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(smtp_relay.host, port, timeout=5)
    smtp_relay.start()
    assert smtp_relay.port == port
    with smtplib.SMTP(smtp_relay.host, port, timeout=10) as client:
        client.login(BOB, "bob-pw")
        client.sendmail(BOB, [ALICE], message("back up"))
    assert len(smtp_relay.wait_for_accepted(1)) == 1


def test_relay_starttls_and_implicit_tls_share_the_dovecot_ca(dovecot_tls: LocalDovecot) -> None:
    with LocalSmtpRelay(
        dovecot_tls, {ALICE: "alice-pw"}, starttls=True, implicit_tls=True, auth_require_tls=True
    ) as relay:
        assert relay.ca_file == dovecot_tls.ca_file and relay.tls_port is not None
        context = ssl.create_default_context(cafile=str(relay.ca_file))
        with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls") and not client.has_extn("auth")
            client.starttls(context=context)
            client.login(ALICE, "alice-pw")
            client.sendmail(ALICE, [ALICE], message("over starttls"))
        with smtplib.SMTP_SSL(relay.host, relay.tls_port, context=context, timeout=10) as client:
            client.login(ALICE, "alice-pw")
            client.sendmail(ALICE, [ALICE], message("over implicit tls"))
    assert subjects(dovecot_tls, ALICE) == ["over starttls", "over implicit tls"]


# ------------------------------------------------------------------------------------ databases


@pytest.mark.postgres
def test_pg_url_is_a_fresh_empty_database(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://postgres@127.0.0.1:5432/emailops_test_")
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as connection:
            assert sa.inspect(connection).get_table_names() == []
            connection.execute(sa.text("CREATE TABLE probe (id integer)"))
    finally:
        engine.dispose()


def test_db_url_works_for_both_backends(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE probe (id integer primary key, text varchar(20))"))
            connection.execute(sa.text("INSERT INTO probe (id, text) VALUES (1, 'ünïcode')"))
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT text FROM probe")).scalar_one() == "ünïcode"
    finally:
        engine.dispose()
