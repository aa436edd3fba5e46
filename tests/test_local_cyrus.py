"""The test suite's Cyrus: unpacked from Debian's packages, real password checks, sessions it can kill."""

from __future__ import annotations

import imaplib
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from localmail import cyrus_packages
from localmail.cyrus import CyrusError, LocalCyrus
from tests.conftest import MAIL_USERS

ALICE, BOB = "alice@example.test", "bob@example.test"
RAW = (
    b"From: carol@example.org\r\nTo: alice@example.test\r\nSubject: hello\r\nMessage-ID: <c1@x>\r\n\r\nhi\r\n"
)


def test_accounts_delivery_and_restart_keep_mail_and_uidvalidity() -> None:
    with LocalCyrus(MAIL_USERS) as cyrus:
        cyrus.deliver([ALICE, BOB], RAW)
        uid = cyrus.append(ALICE, "INBOX", RAW.replace(b"<c1@x>", b"<c2@x>"))
        before = cyrus.folder_status(ALICE)
        with (
            pytest.raises(imaplib.IMAP4.error, match="authentication failure"),
            cyrus.signed_in(ALICE, "not-alices-password"),
        ):
            pass

        cyrus.restart()
        assert cyrus.folder_status(ALICE) == before
        assert before["messages"] == 2 and uid == 2
        assert cyrus.folder_status(BOB)["messages"] == 1


def test_killing_the_sessions_of_one_user_leaves_the_others() -> None:
    with LocalCyrus(MAIL_USERS) as cyrus, cyrus.imap(ALICE) as alice, cyrus.imap(BOB) as bob:
        alice.select_folder("INBOX")
        bob.select_folder("INBOX")
        assert len(cyrus.imap_process_ids()) == 2
        assert cyrus.kill_imap_connections(ALICE) == 1
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            alice.noop()
        assert bob.noop()[0].startswith(b"Completed")
        deadline = time.monotonic() + 5  # the killed process is gone once its exit completes
        while cyrus.imap_process_ids(ALICE) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cyrus.imap_process_ids(ALICE) == []
        assert len(cyrus.imap_process_ids(BOB)) == 1


def test_a_cyrus_not_unpacked_fails_with_how_to_unpack_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cyrus_packages.ROOT_ENVIRONMENT_VARIABLE, str(tmp_path))
    with pytest.raises(CyrusError, match=r"python -m localmail\.cyrus_packages"):
        LocalCyrus(MAIL_USERS)


def test_fetch_unpacks_a_cyrus_that_runs() -> None:
    """What bin/test does on a fresh machine: apt-get download, dpkg -x, and every library found."""
    # Not under tmp_path, whose parents only root may enter: Cyrus's services run as "mail".
    root = Path(tempfile.mkdtemp(prefix="emailops-cyrus-fetch-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        installation = cyrus_packages.fetch(root)
        assert installation == cyrus_packages.find_installation(root)
        unpacked = (installation.tree / cyrus_packages.READY_FILE).read_text().split()
        assert {name.split("_")[0] for name in unpacked} >= set(cyrus_packages.PACKAGES)
        with LocalCyrus(MAIL_USERS, installation=installation) as cyrus:
            cyrus.deliver(ALICE, RAW)
            assert cyrus.folder_status(ALICE)["messages"] == 1
    finally:
        shutil.rmtree(root)


def test_the_sasl_plugins_are_looked_for_where_they_are_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libsasl2 finds PLAIN and sasldb only in SASL_PATH (or where it was built to look): on a
    # machine without libsasl2-modules they are in the unpacked tree. An inherited path is replaced.
    monkeypatch.setenv("SASL_PATH", str(tmp_path))
    with LocalCyrus(MAIL_USERS) as cyrus:
        assert cyrus.folder_status(ALICE)["messages"] == 0
