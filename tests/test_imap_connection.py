"""Connecting as configured: TLS verified, STARTTLS fails closed, failures classified."""

from __future__ import annotations

import pytest

from emailops.config import TlsSecurity
from emailops.imap.connection import ReconnectPolicy, connect
from emailops.imap.errors import (
    ImapAuthError,
    ImapSecurityError,
    ImapTooManyConnectionsError,
    ImapTransientError,
)
from localmail.dovecot import LocalDovecot
from localmail.imap_server import LocalImapServer
from tests.index_helpers import ALICE, imap_config


def test_self_signed_certificate_is_refused_by_default(dovecot_tls: LocalDovecot) -> None:
    assert dovecot_tls.imaps_port is not None
    with pytest.raises(ImapSecurityError, match="certificate"):
        connect(imap_config(dovecot_tls, port=dovecot_tls.imaps_port, security=TlsSecurity.SSL))
    with pytest.raises(ImapSecurityError, match="certificate"):
        connect(imap_config(dovecot_tls, security=TlsSecurity.STARTTLS))


def test_certificate_accepted_with_the_configured_ca(dovecot_tls: LocalDovecot) -> None:
    assert dovecot_tls.imaps_port is not None
    ca = dovecot_tls.ca_file
    for config in (
        imap_config(dovecot_tls, port=dovecot_tls.imaps_port, security=TlsSecurity.SSL, ca_file=ca),
        imap_config(dovecot_tls, security=TlsSecurity.STARTTLS, ca_file=ca),
    ):
        client = connect(config)
        try:
            assert client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"]
        finally:
            client.logout()


def test_starttls_not_offered_is_an_error_not_a_plaintext_login() -> None:
    with LocalDovecot({ALICE: "alice-pw"}, tls=True, starttls_offered=False) as dovecot:
        with pytest.raises(ImapSecurityError, match="does not offer STARTTLS"):
            connect(imap_config(dovecot, security=TlsSecurity.STARTTLS, ca_file=dovecot.ca_file))
        assert "alice-pw" not in dovecot.log_text()


def test_wrong_password_is_an_auth_error_retried_slowly(imap_server: LocalImapServer) -> None:
    with pytest.raises(ImapAuthError) as caught:
        connect(imap_config(imap_server, password="wrong"))
    policy = ReconnectPolicy()
    assert policy.delay(caught.value, 1) >= 60
    assert policy.delay(caught.value, 10) <= 3600 + 10
    assert policy.delay(ImapTransientError("x"), 1) <= 2
    assert policy.delay(ImapTransientError("x"), 20) <= 61
    assert policy.delay(ImapTooManyConnectionsError("x"), 1) >= 30


def test_server_down_is_transient(imap_server: LocalImapServer) -> None:
    imap_server.stop()
    with pytest.raises(ImapTransientError):
        connect(imap_config(imap_server))
