"""Which server this process is waiting for, and which servers have stopped answering.

Every blocking read, write or connect on a mail server's socket runs inside ``WAITS.waiting(...)``
(``emailops.imap.imaplib_internals``, ``emailops.replies.smtp_sender``). Each such call is bounded
by its socket timeout, but a frozen server makes calls time out one after another (one per folder,
then the rules' and the outbox's connections), and together they can last longer than a worker's
heartbeat timeout. ``in_flight(thread)`` lets the worker tell such a wait from a hang: a thread
inside a call younger than the call's bound is waiting on the network, not stuck; a call past its
bound (a socket that did not honour its timeout) no longer counts, so that a truly stuck worker is
still killed.

A call that ends in a timeout (or in an error raised while handling one) marks its server as not
answering, from the start of that call, until a call to the same server returns: ``silences()`` is
what the healthcheck names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# A call counts as a sign of life this long past its socket timeout (scheduling, a slow machine).
OVERDUE_GRACE_SECONDS = 5.0
# Opening a connection is up to three timeouts: the TCP connect, the TLS handshake, the greeting.
OPENING_TIMEOUTS = 3


@dataclass(frozen=True)
class Wait:
    """One blocking call: on ``service`` (``imap``, ``smtp``) at ``endpoint`` (``host:port``)."""

    service: str
    endpoint: str
    since: float  # wall clock (UNIX time) when the call began
    started: float  # monotonic, when the call began
    deadline: float  # monotonic: past it, the call is overdue and no longer a sign of life


@dataclass(frozen=True)
class Silence:
    """A server whose calls have timed out since ``since`` (UNIX time), with no answer since."""

    service: str
    endpoint: str
    since: float


class NetworkWaits:
    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._in_flight: dict[int, Wait] = {}
        self._silences: dict[tuple[str, str], Silence] = {}

    @contextmanager
    def waiting(self, service: str, endpoint: str, bound_seconds: float) -> Iterator[None]:
        """Mark the calling thread as waiting on ``endpoint`` for at most ``bound_seconds``."""
        now = self._monotonic()
        wait = Wait(service, endpoint, self._wall_clock(), now, now + bound_seconds)
        thread = threading.get_ident()
        with self._lock:
            outer = self._in_flight.get(thread)
            self._in_flight[thread] = wait
        try:
            yield
        except Exception as exc:
            if _timed_out(exc):
                with self._lock:
                    key = (service, endpoint)
                    if key not in self._silences:
                        self._silences[key] = Silence(service, endpoint, wait.since)
            raise
        else:
            with self._lock:
                self._silences.pop((service, endpoint), None)
        finally:
            with self._lock:
                if outer is None:
                    self._in_flight.pop(thread, None)
                else:
                    self._in_flight[thread] = outer

    def in_flight(self, thread: int) -> Wait | None:
        """The call ``thread`` is waiting in, unless there is none or it is past its bound."""
        with self._lock:
            wait = self._in_flight.get(thread)
        if wait is None or self._monotonic() > wait.deadline:
            return None
        return wait

    def silences(self) -> list[Silence]:
        """The servers not answering now, each since its first call that timed out."""
        with self._lock:
            return list(self._silences.values())


def _timed_out(error: BaseException) -> bool:
    """A timeout, or an error raised while handling one (smtplib turns a read's timeout into
    ``SMTPServerDisconnected``)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


# The process's waits: the protocol clients mark them, the worker's heartbeat reads them.
WAITS = NetworkWaits()
