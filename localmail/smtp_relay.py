"""A throwaway authenticated SMTP submission server on loopback that hands mail to a local IMAP server.

It plays the part of the operator's outgoing mail server: it requires AUTH (PLAIN or LOGIN, and
XOAUTH2 / OAUTHBEARER with bearer tokens when given a way to check them),
optionally offers STARTTLS and/or implicit TLS, records every message it accepts, and passes each
one on over LMTP, so a reply sent to a local account lands in that account's INBOX. Recipients
that the mail server does not know are accepted and only recorded, like mail a real relay would send
on to the internet. Failures can be injected at RCPT or DATA, and the server can be stopped and
started again on the same port to simulate an outage.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import smtplib
import ssl
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from localmail.certs import TestCertificates, make_test_certificates
from localmail.dovecot import LOOPBACK, default_scratch_root, free_loopback_port
from localmail.imap_server import LocalImapServer, lmtp_deliver

FailureStage = Literal["RCPT", "DATA"]
SERVER_NAME = "relay.example.test"


@dataclass(frozen=True)
class AcceptedMessage:
    """One message the relay answered 250 to at the end of DATA."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    auth_login: str | None
    # Recipients the mail server accepted over LMTP; the others were only recorded.
    delivered_to: tuple[str, ...]


@dataclass(frozen=True)
class RejectedCommand:
    """An injected failure that was answered, for assertions on retry behaviour."""

    stage: FailureStage
    code: int
    mail_from: str
    rcpt_tos: tuple[str, ...]


@dataclass
class _PlannedFailure:
    code: int
    text: str
    remaining: int


# The bearer token and the user of an XOAUTH2 or OAUTHBEARER initial response.
_XOAUTH2 = re.compile(r"^user=([^\x01]*)\x01auth=Bearer ([^\x01]+)\x01\x01$")
_OAUTHBEARER = re.compile(r"^n,a=([^,]*),\x01(?:[a-z]+=[^\x01]*\x01)*?auth=Bearer ([^\x01]+)\x01")


class _RelayHandler:
    """aiosmtpd handler: failure injection, recording and LMTP hand-off."""

    def __init__(self, relay: LocalSmtpRelay) -> None:
        self._relay = relay

    def count_session(self, change: int) -> None:
        self._relay._count_session(change)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, _XOAUTH2)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, _OAUTHBEARER)

    async def _bearer(self, server: SMTP, args: list[str], pattern: re.Pattern[str]) -> AuthResult:
        """SASL with an OAuth2 bearer token, checked by the relay's ``bearer_user``; a refusal is
        the JSON challenge of XOAUTH2 / RFC 7628 section 3.2.2, then 535 after the client's reply."""
        if len(args) > 1:
            response: bytes | object = base64.b64decode(args[1])
        else:
            response = await server.challenge_auth("")
        if not isinstance(response, bytes):
            return AuthResult(success=False, handled=False)
        match = pattern.match(response.decode("utf-8", "replace"))
        user = self._relay._bearer_user(match.group(2)) if match else None
        if match is None or user is None or user.lower() != match.group(1).replace("=2C", ",").lower():
            error = json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"})
            await server.challenge_auth(error)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, handled=False, auth_data=LoginPassword(user.encode(), b""))

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        failure = self._relay._take_failure("RCPT", envelope, extra_rcpt=address)
        if failure is not None:
            return failure
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        failure = self._relay._take_failure("DATA", envelope)
        if failure is not None:
            return failure
        data = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not data:
            data = envelope.content
        mail_from = envelope.mail_from or ""
        auth_login = _login_name(session.auth_data)
        try:
            delivered = await asyncio.to_thread(self._relay._hand_off, mail_from, envelope.rcpt_tos, data)
        except smtplib.SMTPException as error:
            return f"451 4.3.0 Local delivery failed: {error}"
        except OSError as error:
            return f"451 4.4.1 Local delivery unreachable: {error}"
        self._relay._record(
            AcceptedMessage(
                mail_from=mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=data,
                auth_login=auth_login,
                delivered_to=tuple(delivered),
            )
        )
        return "250 2.0.0 Message accepted for delivery"


def _login_name(auth_data: Any) -> str | None:
    if isinstance(auth_data, LoginPassword):
        return auth_data.login.decode("utf-8", errors="replace")
    return None


class _QuietSession(Session):
    """aiosmtpd's own AUTH code sets the deprecated ``login_data``; keep it from warning."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _RelaySmtp(SMTP):
    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.event_handler.count_session(+1)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.count_session(-1)
        super().connection_lost(error)


class _QuietController(Controller):
    """A Controller whose SMTP sessions do not warn about choices made on purpose.

    Loopback tests require AUTH without TLS by design, which aiosmtpd warns about per session.
    """

    def factory(self) -> SMTP:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
            return _RelaySmtp(self.handler, **self.SMTP_kwargs)


class LocalSmtpRelay:
    """An SMTP submission server on ``127.0.0.1:port`` (and ``tls_port`` with implicit TLS).

    ``credentials`` maps login names to passwords accepted by AUTH PLAIN/LOGIN. With ``starttls``
    the plain port offers STARTTLS; with ``implicit_tls`` a second port speaks TLS from the first
    byte. Both use ``certificates``, by default the mail server's (so one ``ca_file`` verifies both
    servers), or a fresh test CA when the mail server has none. ``auth_require_tls`` refuses AUTH
    before TLS, as a strict provider would. ``bearer_user`` maps an OAuth2 access token to the
    account it is valid for (None: invalid), enabling AUTH XOAUTH2 and OAUTHBEARER;
    ``auth_exclude`` names mechanisms not to offer (e.g. ``("OAUTHBEARER",)``, as Microsoft 365).
    """

    def __init__(
        self,
        mail_server: LocalImapServer | None,
        credentials: Mapping[str, str],
        *,
        starttls: bool = False,
        implicit_tls: bool = False,
        auth_require_tls: bool = False,
        certificates: TestCertificates | None = None,
        bearer_user: Callable[[str], str | None] | None = None,
        auth_exclude: tuple[str, ...] = (),
    ) -> None:
        self.mail_server = mail_server
        self._bearer_check = bearer_user
        self._auth_exclude = auth_exclude
        self._credentials = dict(credentials)
        self._starttls = starttls
        self._auth_require_tls = auth_require_tls
        self.host = LOOPBACK
        self.port = free_loopback_port(self.host)
        self.tls_port: int | None = free_loopback_port(self.host) if implicit_tls else None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.certificates: TestCertificates | None = None
        if starttls or implicit_tls or auth_require_tls:
            self.certificates = certificates or (mail_server.certificates if mail_server else None)
            if self.certificates is None:
                self._scratch = tempfile.TemporaryDirectory(
                    prefix="emailops-smtp-", dir=default_scratch_root()
                )
                self.certificates = make_test_certificates(Path(self._scratch.name))
        self._lock = threading.Condition()
        self._accepted: list[AcceptedMessage] = []
        self._rejected: list[RejectedCommand] = []
        self._failures: dict[FailureStage, deque[_PlannedFailure]] = {"RCPT": deque(), "DATA": deque()}
        self._controllers: list[Controller] = []
        self._open_sessions = 0

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def ca_file(self) -> Path | None:
        return self.certificates.ca_file if self.certificates is not None else None

    @property
    def running(self) -> bool:
        return bool(self._controllers)

    def _server_tls_context(self) -> ssl.SSLContext:
        assert self.certificates is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificates.cert_file, self.certificates.key_file)
        return context

    def _controller(self, port: int, implicit: bool) -> Controller:
        smtp_options: dict[str, Any] = {
            "server_hostname": SERVER_NAME,
            "authenticator": self._authenticate,
            "auth_required": True,
            "auth_require_tls": self._auth_require_tls,
            "auth_exclude_mechanism": self._auth_exclude,
        }
        if implicit:
            smtp_options["ssl_context"] = self._server_tls_context()
            # aiosmtpd only counts STARTTLS as TLS; here the whole connection already is.
            smtp_options["auth_require_tls"] = False
        elif self._starttls or self._auth_require_tls:
            smtp_options["tls_context"] = self._server_tls_context()
        return _QuietController(_RelayHandler(self), hostname=self.host, port=port, **smtp_options)

    def start(self) -> None:
        """Listen (again) on the same port(s); returns once the server answers."""
        if self.running:
            return
        plans = [(self.port, False)] + ([(self.tls_port, True)] if self.tls_port else [])
        try:
            for port, implicit in plans:
                controller = self._controller(port, implicit)
                controller.start()
                self._controllers.append(controller)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        """Close the listening port(s) and drop open sessions: clients see the server down."""
        controllers, self._controllers = self._controllers, []
        for controller in controllers:
            controller.stop(no_assert=True)

    def close(self) -> None:
        self.stop()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> LocalSmtpRelay:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- behaviour

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", errors="replace")
        password = auth_data.password.decode("utf-8", errors="replace")
        with self._lock:
            known = self._credentials.get(login)
        accepted = known is not None and known == password
        return AuthResult(success=accepted, handled=False, auth_data=auth_data if accepted else None)

    def _count_session(self, change: int) -> None:
        with self._lock:
            self._open_sessions += change

    def open_sessions(self) -> int:
        """Client connections open now (a sender's idle connection shows here until it quits)."""
        with self._lock:
            return self._open_sessions

    def set_password(self, login: str, password: str) -> None:
        """Accept ``password`` for ``login`` from the next AUTH on (as an operator fixing it would)."""
        with self._lock:
            self._credentials[login] = password

    def _bearer_user(self, token: str) -> str | None:
        return self._bearer_check(token) if self._bearer_check is not None else None

    def fail_next(self, code: int, text: str, times: int = 1, at: FailureStage = "DATA") -> None:
        """Answer the next ``times`` DATA commands (or RCPT commands) with ``code text``.

        4xx codes are transient failures a client should retry, 5xx permanent ones. At RCPT each
        RCPT TO command counts once; at DATA each message counts once.
        """
        if not 400 <= code <= 599:
            raise ValueError("an injected failure needs a 4xx or 5xx code")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._failures[at].append(_PlannedFailure(code, text, times))

    def _take_failure(
        self, stage: FailureStage, envelope: Envelope, extra_rcpt: str | None = None
    ) -> str | None:
        with self._lock:
            plans = self._failures[stage]
            if not plans:
                return None
            plan = plans[0]
            plan.remaining -= 1
            if plan.remaining == 0:
                plans.popleft()
            rcpts = tuple(envelope.rcpt_tos) + ((extra_rcpt,) if extra_rcpt else ())
            self._rejected.append(RejectedCommand(stage, plan.code, envelope.mail_from or "", rcpts))
            self._lock.notify_all()
        return f"{plan.code} {plan.text}"

    def _hand_off(self, mail_from: str, rcpt_tos: list[str], data: bytes) -> list[str]:
        """LMTP each recipient into the mail server; returns those it accepted.

        A permanent refusal means "not a local account" and is not an error; a transient one or
        an unreachable mail server raises, and the client gets a 451.
        """
        if self.mail_server is None:
            return []
        delivered = []
        for recipient in rcpt_tos:
            try:
                lmtp_deliver(self.mail_server.host, self.mail_server.lmtp_port, mail_from, recipient, data)
            except smtplib.SMTPRecipientsRefused as refusal:
                code = next(iter(refusal.recipients.values()))[0]
                if code < 500:
                    raise
                continue
            delivered.append(recipient)
        return delivered

    def _record(self, message: AcceptedMessage) -> None:
        with self._lock:
            self._accepted.append(message)
            self._lock.notify_all()

    # ----------------------------------------------------------------------------- assertions

    @property
    def accepted(self) -> list[AcceptedMessage]:
        """The messages accepted so far, oldest first."""
        with self._lock:
            return list(self._accepted)

    @property
    def rejected(self) -> list[RejectedCommand]:
        """The injected failures answered so far, oldest first."""
        with self._lock:
            return list(self._rejected)

    def wait_for_accepted(self, count: int, timeout: float = 10.0) -> list[AcceptedMessage]:
        """Block until at least ``count`` messages were accepted; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._accepted) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._accepted)} of {count} messages accepted in time")
                self._lock.wait(remaining)
            return list(self._accepted)

    def clear(self) -> None:
        """Forget accepted and rejected records and any planned failures."""
        with self._lock:
            self._accepted.clear()
            self._rejected.clear()
            for plans in self._failures.values():
                plans.clear()
