"""SMTP delivery of composed replies, one connection reused for a burst.

Security (``ServerConfig.security``): ``ssl`` is implicit TLS; ``starttls`` requires the server to
offer STARTTLS and fails closed when it does not (never a plaintext fallback); ``none`` is
plaintext, only when configured. Certificates and host names are verified against the system CAs
plus ``ca_file``. AUTH uses the account's credentials when the server offers AUTH: the password,
or with ``ServerConfig.tokens`` an OAuth2 access token (OAUTHBEARER when offered, else XOAUTH2;
a refused token is replaced by a newer one once). smtplib's debug output stays off, so no
credential reaches a log.

Outcomes: ``send`` returns on 250 and otherwise raises
- ``TransientSendError``: 4xx, connection problems, timeouts, TLS and AUTH problems (worth retrying
  later: the message was certainly not accepted); ``SmtpAuthError`` when the sign-in was refused;
- ``PermanentSendError``: a 5xx answer to the envelope or the message (carries the server's text);
- ``UncertainSendError``: the whole message was transmitted but no answer came back - the server
  may have accepted it, so it must not be resent automatically.

Every blocking call on the socket (connect, TLS, each command and each answer) is bounded by the
configured timeout and marked as a network wait (``emailops.network_waits``): a server that accepts
the connection and says nothing holds up the outbox for at most a few timeouts, and meanwhile the
worker is not taken for hung; the healthcheck's ``--verbose`` names the silent server.

``sign_in_status()`` tells the operator (the worker status file, the healthcheck) whether the
server refuses the account's sign-in: since when, and the last refusal's text.

The envelope sender is the configured From address rather than the null path RFC 3834 section 3.3
suggests: authenticated submission servers commonly refuse ``MAIL FROM:<>``. Loops are prevented by
``Auto-Submitted: auto-replied`` and the robot checks instead.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from emailops.auth.errors import OAuth2Error, OAuth2UnavailableError
from emailops.auth.sasl import (
    OAUTHBEARER,
    NoOAuth2Mechanism,
    TokenRefused,
    TokenRefusedAgain,
    choose_mechanism,
    oauthbearer,
    sign_in_with_one_refresh,
    xoauth2,
)
from emailops.config import AccessTokens, ServerConfig, TlsSecurity
from emailops.network_waits import OPENING_TIMEOUTS, OVERDUE_GRACE_SECONDS, WAITS
from emailops.tls import verifying_context

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class SmtpSendError(Exception):
    """A reply was not (certainly) delivered. ``code`` is the SMTP reply code, 0 if none."""

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class TransientSendError(SmtpSendError):
    """Not accepted this time; retry later."""


class SmtpSecurityError(TransientSendError):
    """The connection could not be protected as configured (e.g. STARTTLS not offered)."""


class SmtpAuthError(TransientSendError):
    """The server refused the account's credentials (password or OAuth2 token); the message
    names what to fix. Retried later like any transient failure."""


class PermanentSendError(SmtpSendError):
    """Refused with a 5xx answer; retrying the same message will not help."""


class UncertainSendError(SmtpSendError):
    """Transmitted, but the final answer never came: the message may have been delivered."""


def _reply_text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return " ".join(text.split())


def _classify(code: int, reply: bytes | str, stage: str) -> SmtpSendError:
    message = f"{stage}: {code} {_reply_text(reply)}".strip()
    if 500 <= code <= 599:
        return PermanentSendError(message, code=code)
    return TransientSendError(message, code=code)


@dataclass(frozen=True)
class SmtpSignInStatus:
    """What the sender's sign-ins last saw (UNIX times; all None while SMTP has not been used).

    ``signed_in_at``: the last connection set up for sending (signed in, or no sign-in asked).
    ``refused_since``: the first refusal (``SmtpAuthError``) since then, None when none since.
    ``error`` / ``error_at``: the last refusal, kept after a later sign-in (as ``FolderStatus``)."""

    signed_in_at: float | None = None
    refused_since: float | None = None
    error: str | None = None
    error_at: float | None = None


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _access_token(tokens: AccessTokens, rejected: str | None = None) -> str:
    try:
        return tokens.access_token(rejected)
    except OAuth2UnavailableError as exc:
        raise TransientSendError(f"no OAuth2 access token: {exc}") from None
    except OAuth2Error as exc:
        raise SmtpAuthError(f"OAuth2 sign-in refused: {exc}") from None


class _WaitMarkingSMTP(smtplib.SMTP):
    """smtplib's blocking calls as network waits: ``connect`` (TCP, implicit TLS, the greeting),
    ``starttls``, then every ``send`` and ``getreply`` (each command of smtplib goes through both),
    each bounded by the socket timeout."""

    _endpoint = ""

    def _bound(self, timeouts: int = 1) -> float:
        return float(self.timeout) * timeouts + OVERDUE_GRACE_SECONDS

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        self._endpoint = f"{host}:{port}"
        with WAITS.waiting("smtp", self._endpoint, self._bound(OPENING_TIMEOUTS)):
            return super().connect(host, port, source_address)

    def starttls(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        with WAITS.waiting("smtp", self._endpoint, self._bound(2)):
            return super().starttls(*args, **kwargs)

    def send(self, s: ReadableBuffer | str) -> None:
        with WAITS.waiting("smtp", self._endpoint, self._bound()):
            super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        with WAITS.waiting("smtp", self._endpoint, self._bound()):
            return super().getreply()


class _WaitMarkingSMTPSSL(_WaitMarkingSMTP, smtplib.SMTP_SSL):
    """Implicit TLS, marked the same way."""


class SmtpSender:
    """Sends messages over one lazily opened SMTP connection; ``close()`` when the burst is over,
    or ``close_if_unused()`` regularly."""

    # Unused for this long, ``close_if_unused`` closes the connection: a worker serves every
    # account's outbox, and connections kept open grew with the accounts it ever sent for (45 of
    # 50 per worker after 2 hours of the 50-account soak); a burst of replies reuses it.
    IDLE_CLOSE_SECONDS = 30.0

    def __init__(
        self,
        config: ServerConfig,
        *,
        local_hostname: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        # gethostname() needs no DNS lookup (getfqdn() can stall for seconds in a container).
        self.local_hostname = local_hostname or socket.gethostname() or "localhost"
        self._smtp: smtplib.SMTP | None = None
        self.connections_opened = 0
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._last_used = 0.0
        self._sign_in = SmtpSignInStatus()
        self._log = structlog.get_logger().bind(component="smtp", host=config.host, port=config.port)

    def __enter__(self) -> SmtpSender:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def sign_in_status(self) -> SmtpSignInStatus:
        return self._sign_in

    def close_if_unused(self) -> None:
        """Close the connection if unused for ``IDLE_CLOSE_SECONDS``."""
        if self._smtp is not None and self._monotonic() - self._last_used >= self.IDLE_CLOSE_SECONDS:
            self.close()

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def sign_in(self) -> None:
        """Connect and sign in as for sending, sending nothing (``accounts test``); raises the
        ``SmtpSendError`` that sending would, with the server's answer."""
        self._connection()

    def _connect(self) -> smtplib.SMTP:
        cfg = self.config
        try:
            smtp = self._open_and_sign_in()
        except SmtpSendError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise SmtpAuthError(
                f"authentication failed: {exc.smtp_code} {_reply_text(exc.smtp_error)}", code=exc.smtp_code
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise TransientSendError(
                f"connection setup refused: {exc.smtp_code} {_reply_text(exc.smtp_error)}", code=exc.smtp_code
            ) from None
        except ssl.SSLError as exc:
            raise SmtpSecurityError(f"TLS with {cfg.host}:{cfg.port} failed: {exc}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientSendError(f"cannot connect to {cfg.host}:{cfg.port}: {exc}") from None
        self.connections_opened += 1
        self._log.info("smtp connected", security=cfg.security.value)
        return smtp

    def _open_and_sign_in(self) -> smtplib.SMTP:
        """A connection protected and signed in as configured; on any failure its socket is closed
        here rather than left to the garbage collector."""
        cfg = self.config
        context = verifying_context(cfg.ca_file) if cfg.security is not TlsSecurity.NONE else None
        if cfg.security is TlsSecurity.SSL:
            smtp: smtplib.SMTP = _WaitMarkingSMTPSSL(
                cfg.host,
                cfg.port,
                local_hostname=self.local_hostname,
                timeout=cfg.timeout_seconds,
                context=context,
            )
        else:
            smtp = _WaitMarkingSMTP(
                cfg.host, cfg.port, local_hostname=self.local_hostname, timeout=cfg.timeout_seconds
            )
        try:
            smtp.set_debuglevel(0)
            smtp.ehlo()
            if cfg.security is TlsSecurity.STARTTLS:
                if not smtp.has_extn("starttls"):
                    raise SmtpSecurityError(
                        f"{cfg.host}:{cfg.port} does not offer STARTTLS; refusing to send in plaintext"
                    )
                smtp.starttls(context=context)
                smtp.ehlo()
            if smtp.has_extn("auth") and cfg.username:
                if cfg.tokens is not None:
                    self._oauth2_auth(smtp, cfg.tokens)
                else:
                    smtp.login(cfg.username, cfg.password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _oauth2_auth(self, smtp: smtplib.SMTP, tokens: AccessTokens) -> None:
        cfg = self.config
        try:
            mechanism = choose_mechanism(smtp.esmtp_features.get("auth", "").split())
        except NoOAuth2Mechanism as exc:
            raise SmtpAuthError(f"{cfg.host}: {exc}") from None
        build = oauthbearer if mechanism == OAUTHBEARER else xoauth2

        def sign_in(token: str) -> None:
            try:
                # On a refusal the server sends a JSON error as a challenge; the empty answer ends it.
                smtp.auth(mechanism, lambda challenge=None: "" if challenge else build(cfg.username, token))
            except smtplib.SMTPAuthenticationError as exc:
                raise TokenRefused(f"{exc.smtp_code} {_reply_text(exc.smtp_error)}", exc.smtp_code) from None

        try:
            sign_in_with_one_refresh(lambda rejected: _access_token(tokens, rejected), sign_in)
        except TokenRefusedAgain as exc:
            if exc.second is None:
                raise SmtpAuthError(
                    f"{cfg.host} refused a freshly issued OAuth2 access token ({mechanism}): check that the "
                    "app may send as this mailbox (SMTP AUTH on, permissions, EMAIL_OAUTH2_SCOPES, "
                    "EMAIL_USERNAME)"
                ) from None
            raise SmtpAuthError(
                f"{cfg.host} refused a newly refreshed OAuth2 access token "
                f"({mechanism}: {exc.second.detail}): check that the app may send as this mailbox",
                code=exc.second.code or 0,
            ) from None

    def _connection(self) -> smtplib.SMTP:
        """The open connection if it still answers (NOOP), otherwise a new one."""
        if self._smtp is not None:
            try:
                code, _ = self._smtp.noop()
                if code == 250:
                    return self._smtp
            except (smtplib.SMTPException, OSError):
                pass
            self._log.info("smtp connection dropped; reconnecting")
            self.close()
        now = self._wall_clock()
        try:
            self._smtp = self._connect()
        except SmtpAuthError as exc:
            self._sign_in = SmtpSignInStatus(
                signed_in_at=self._sign_in.signed_in_at,
                refused_since=self._sign_in.refused_since or now,
                error=str(exc),
                error_at=now,
            )
            raise
        self._sign_in = SmtpSignInStatus(
            signed_in_at=self._wall_clock(), error=self._sign_in.error, error_at=self._sign_in.error_at
        )
        return self._smtp

    def send(self, *, envelope_from: str, recipient: str, raw: bytes) -> str:
        """Deliver ``raw`` (CRLF line ends) to exactly ``recipient``; return the server's 250 text."""
        smtp = self._connection()
        self._last_used = self._monotonic()
        try:
            code, reply = smtp.mail(envelope_from)
            if code != 250:
                self._reset()
                raise _classify(code, reply, "MAIL FROM")
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                self._reset()
                raise _classify(code, reply, "RCPT TO")
            smtp.putcmd("data")
            code, reply = smtp.getreply()
            if code != 354:
                self._reset()
                raise _classify(code, reply, "DATA")
            payload = _LEADING_DOT.sub(b"..", raw)
            if not payload.endswith(b"\r\n"):
                payload += b"\r\n"
            smtp.send(payload + b".\r\n")
        except SmtpSendError:
            raise
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise TransientSendError(f"connection lost before the message was complete: {exc}") from None
        try:
            code, reply = smtp.getreply()
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise UncertainSendError(f"no answer after the message was transmitted: {exc}") from None
        if code != 250:
            self._reset()
            raise _classify(code, reply, "end of DATA")
        return _reply_text(reply)

    def _reset(self) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()
