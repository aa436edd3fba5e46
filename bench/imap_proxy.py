"""A counting TCP proxy for IMAP on loopback: bytes each way and the command lines the client sent.

Put between a client and Dovecot, it measures what a sync pass or an idle period costs on the wire
without touching the client's code. A "command" is one CRLF-terminated line from the client: a
tagged command (``a12 SELECT INBOX``) or an untagged continuation such as IDLE's ``DONE``. The
clients measured here send no literals, so lines and commands are the same thing; every command is
one round trip (the client waits for its answer before the next, bar IDLE's DONE).

Only the command verb is recorded (``SELECT``, ``UID FETCH``, ``DONE``), never its arguments: the
LOGIN line carries the password.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

_BUFFER = 256 * 1024
_TWO_WORD_VERBS = {b"UID"}


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


class CountingProxy:
    """Listens on a free loopback port and forwards every connection to ``upstream``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._traffic = Traffic()
        self._sockets: list[socket.socket] = []
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

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
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
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        pending = b""
        try:
            while True:
                data = source.recv(_BUFFER)
                if not data:
                    break
                with self._lock:
                    if from_client:
                        self._traffic.client_bytes += len(data)
                        pending += data
                        *lines, pending = pending.split(b"\r\n")
                        self._traffic.commands += [command_verb(line) for line in lines]
                    else:
                        self._traffic.server_bytes += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
