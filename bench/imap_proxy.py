"""A counting TCP proxy for IMAP on loopback: bytes each way and the command lines the client sent.

Put between a client and Dovecot, it measures what a sync pass or an idle period costs on the wire
without touching the client's code. A "command" is one CRLF-terminated line from the client: a
tagged command (``a12 SELECT INBOX``) or an untagged continuation such as IDLE's ``DONE``; a
literal (``{N}`` at a line's end, as APPEND sends the message) and the rest of its line belong to
the command. Every command is one round trip (the client waits for its answer before the next, bar
IDLE's DONE).

Only the command verb is recorded (``SELECT``, ``UID FETCH``, ``DONE``), never its arguments: the
LOGIN line carries the password. Tests also use it to count the connections a client opens
(``sessions``), to refuse new ones, to stop answering altogether (``stalled``), and to lose the
server's answer to a command (``lose_answer_to``): the command reaches the server, which acts on
it, and the client sees the connection drop instead of the answer.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field

_BUFFER = 256 * 1024
_TWO_WORD_VERBS = {b"UID"}
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")


@dataclass
class Traffic:
    """Counters since the last ``reset``."""

    client_bytes: int = 0
    server_bytes: int = 0
    commands: list[str] = field(default_factory=list)

    @property
    def round_trips(self) -> int:
        return len(self.commands)


def command_verb(line: bytes) -> str:
    """``a3 UID FETCH 1:* (FLAGS)`` -> ``UID FETCH``; ``DONE`` -> ``DONE``."""
    words = line.split()
    if not words:
        return ""
    if len(words) == 1:
        return words[0].decode("ascii", "replace").upper()
    verb = words[1:3] if words[1].upper() in _TWO_WORD_VERBS and len(words) > 2 else words[1:2]
    return b" ".join(verb).decode("ascii", "replace").upper()


class CommandLines:
    """Splits what a client sends into command lines: a literal and the rest of its line are part of
    the command that announced it, not lines of their own."""

    def __init__(self) -> None:
        self.pending = b""
        self.literal_left = 0
        self.continuing = False

    def feed(self, data: bytes) -> list[bytes]:
        self.pending += data
        lines: list[bytes] = []
        while True:
            if self.literal_left:
                taken = min(self.literal_left, len(self.pending))
                self.pending = self.pending[taken:]
                self.literal_left -= taken
                if self.literal_left:
                    return lines
            end = self.pending.find(b"\r\n")
            if end < 0:
                return lines
            line, self.pending = self.pending[:end], self.pending[end + 2 :]
            if not self.continuing:
                lines.append(line)
            literal = _LITERAL.search(line)
            self.literal_left = int(literal.group(1)) if literal else 0
            self.continuing = literal is not None


@dataclass
class _Session:
    """One proxied connection: the verbs its client sent, and the tag whose answer is to be lost."""

    client: socket.socket
    server: socket.socket
    verbs: list[str] = field(default_factory=list)
    doomed_tag: bytes | None = None


class CountingProxy:
    """Listens on a free loopback port and forwards every connection to ``upstream``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._traffic = Traffic()
        self._sessions: list[_Session] = []
        self._doomed_verb: str | None = None
        # While True, a new connection is closed at once (the server looks unreachable).
        self.refusing = False
        # While True, nothing the server sends reaches a client (it is read and dropped): the
        # server looks as if it stopped answering, mid-session or before its greeting.
        self.stalled = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="imap-proxy", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self._traffic = Traffic()

    def snapshot(self) -> Traffic:
        with self._lock:
            t = self._traffic
            return Traffic(t.client_bytes, t.server_bytes, list(t.commands))

    def sessions(self) -> list[list[str]]:
        """The command verbs of each connection forwarded since the proxy started, oldest first."""
        with self._lock:
            return [list(s.verbs) for s in self._sessions]

    def lose_answer_to(self, verb: str) -> None:
        """The next command ``verb`` (e.g. ``APPEND``) is forwarded; the server's tagged answer to it
        is not, and both sides of that connection are closed when it comes."""
        with self._lock:
            self._doomed_verb = verb.upper()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for session in self._sessions:
            _shut(session)
            for sock in (session.client, session.server):
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _address = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _Session(client, server)
            with self._lock:
                self._sessions.append(session)
            threading.Thread(target=self._pump_client, args=(session,), daemon=True).start()
            threading.Thread(target=self._pump_server, args=(session,), daemon=True).start()

    def _pump_client(self, session: _Session) -> None:
        lines = CommandLines()
        try:
            while data := session.client.recv(_BUFFER):
                with self._lock:
                    self._traffic.client_bytes += len(data)
                    for line in lines.feed(data):
                        verb = command_verb(line)
                        self._traffic.commands.append(verb)
                        session.verbs.append(verb)
                        if verb == self._doomed_verb:
                            session.doomed_tag = line.split()[0]
                            self._doomed_verb = None
                session.server.sendall(data)
        except OSError:
            pass
        finally:
            _shut(session)

    def _pump_server(self, session: _Session) -> None:
        pending = b""
        try:
            while data := session.server.recv(_BUFFER):
                with self._lock:
                    self._traffic.server_bytes += len(data)
                    doomed = session.doomed_tag
                if self.stalled:
                    continue
                if doomed is None:
                    session.client.sendall(data)
                    continue
                # Forward whole lines until the doomed answer, which is dropped with the connection.
                pending += data
                *lines, pending = pending.split(b"\r\n")
                for line in lines:
                    if line.startswith(doomed + b" "):
                        return
                    session.client.sendall(line + b"\r\n")
        except OSError:
            pass
        finally:
            _shut(session)


def _shut(session: _Session) -> None:
    for sock in (session.client, session.server):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
