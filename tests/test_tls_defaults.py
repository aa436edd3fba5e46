"""The production TLS defaults against TLS servers: security chosen from the port (no
EMAIL_*_SECURITY set), certificates verified, no fallback to plaintext.

Every other integration test sets EMAIL_*_SECURITY=none; these leave it unset, as operators do.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from emailops.config import TlsSecurity
from emailops.imap.connection import connect, logout_quietly
from emailops.imap.errors import ImapSecurityError
from emailops.replies.smtp_sender import SmtpSecurityError, SmtpSender
from localmail.certs import make_test_certificates
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from prod.runtime_settings import RuntimeSettings
from tests.conftest import MAIL_USERS
from tests.index_helpers import ALICE, daemon_env

REPO = Path(__file__).resolve().parents[1]
OTHER_HOST = ("DNS:mail.other.test",)


def production_env(dovecot: LocalDovecot, data: Path, **overrides: str) -> dict[str, str]:
    env = daemon_env(dovecot, data, **overrides)
    for name in ("EMAIL_IMAP_SECURITY", "EMAIL_SMTP_SECURITY"):
        env.pop(name)
    return env


def settings_from(env: dict[str, str]) -> RuntimeSettings:
    return RuntimeSettings.from_env(**{k.lower(): v for k, v in env.items() if k.startswith("EMAIL_")})


def sync_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailops", "sync", "--once"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_imap_default_is_starttls_verified_refused_untrusted_and_accepted_with_the_ca_file(
    dovecot_tls: LocalDovecot, tmp_path: Path
) -> None:
    dovecot_tls.deliver(ALICE, b"From: a@example.org\r\nSubject: over tls\r\n\r\nhello\r\n")
    env = production_env(dovecot_tls, tmp_path)
    settings = settings_from(env)
    assert settings.imap_config().security is TlsSecurity.STARTTLS  # port 143-like: STARTTLS
    refused = sync_once(env)
    assert refused.returncode != 0
    assert "certificate verify failed" in refused.stdout + refused.stderr
    assert "over tls" not in refused.stdout
    accepted = sync_once({**env, "EMAIL_TLS_CA_FILE": str(dovecot_tls.ca_file)})
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert '"new": 1' in accepted.stdout or "1 new" in accepted.stdout, accepted.stdout


def test_a_certificate_from_the_trusted_ca_for_another_host_name_is_refused(tmp_path: Path) -> None:
    with LocalDovecot(MAIL_USERS, tls=True, tls_names=OTHER_HOST) as dovecot:
        env = production_env(dovecot, tmp_path, EMAIL_TLS_CA_FILE=str(dovecot.ca_file))
        settings = settings_from(env)
        with pytest.raises(ImapSecurityError, match=r"match|mismatch"):
            logout_quietly(connect(settings.imap_config()))
        assert dovecot.imaps_port is not None
        implicit = replace(settings.imap_config(), port=dovecot.imaps_port, security=TlsSecurity.SSL)
        with pytest.raises(ImapSecurityError, match=r"match|mismatch"):
            logout_quietly(connect(implicit))


def test_smtp_default_is_starttls_and_refuses_a_certificate_for_another_host(
    dovecot: LocalDovecot, tmp_path: Path
) -> None:
    certificates = make_test_certificates(tmp_path / "other", OTHER_HOST)
    with LocalSmtpRelay(
        dovecot, MAIL_USERS, starttls=True, auth_require_tls=True, certificates=certificates
    ) as relay:
        env = production_env(
            dovecot, tmp_path, EMAIL_SMTP_PORT=str(relay.port), EMAIL_TLS_CA_FILE=str(certificates.ca_file)
        )
        settings = settings_from(env)
        assert settings.smtp_config().security is TlsSecurity.STARTTLS
        with SmtpSender(settings.smtp_config()) as sender, pytest.raises(SmtpSecurityError):
            sender.send(envelope_from=ALICE, recipient="bob@example.test", raw=b"Subject: x\r\n\r\nx\r\n")
        assert relay.accepted == []
