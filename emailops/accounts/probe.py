"""``accounts test``: sign in to the account's IMAP and SMTP servers as the daemon would."""

from __future__ import annotations

from dataclasses import dataclass

from emailops.accounts.config import AccountConfig, Deployment
from emailops.config import AccessTokens
from emailops.imap.connection import connect, logout_quietly
from emailops.imap.errors import ImapError
from emailops.replies.smtp_sender import SmtpSender, SmtpSendError


@dataclass(frozen=True)
class ProbeResult:
    """What each server answered: the IMAP folders, or the error (the server's own words)."""

    imap_folders: tuple[str, ...] = ()
    imap_error: str | None = None
    smtp_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.imap_error is None and self.smtp_error is None


def probe_account(account: AccountConfig, deployment: Deployment, tokens: AccessTokens | None) -> ProbeResult:
    """Sign in to IMAP and list the folders, then sign in to SMTP (nothing is sent)."""
    folders: tuple[str, ...] = ()
    imap_error = smtp_error = None
    try:
        client = connect(account.imap_config(deployment, tokens))
        try:
            folders = tuple(name for _flags, _delimiter, name in client.list_folders())
        finally:
            logout_quietly(client)
    except ImapError as exc:
        imap_error = f"{type(exc).__name__}: {exc}"
    try:
        with SmtpSender(account.smtp_config(deployment, tokens)) as sender:
            sender.sign_in()
    except SmtpSendError as exc:
        smtp_error = f"{type(exc).__name__}: {exc}"
    return ProbeResult(imap_folders=folders, imap_error=imap_error, smtp_error=smtp_error)
