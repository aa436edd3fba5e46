"""Loopback servers that misbehave after accepting a connection: one that says nothing (a frozen
mail server, a firewall that drops packets after the handshake, a proxy whose backend hangs), one
that resets every connection at once."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def loopback_server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """Yield the port of a server that passes each accepted connection to ``handle``; the
    connections ``handle`` leaves open are closed when the server stops."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            connection, _ = listener.accept()
            connections.append(connection)
            handle(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        socket.create_connection(listener.getsockname()).close()  # wakes accept() to see stop
        thread.join(5)
        listener.close()
        for connection in connections:
            connection.close()


def silent_server(greeting: bytes = b"") -> contextlib.AbstractContextManager[int]:
    """A server that sends ``greeting`` (nothing by default) on each connection, then reads
    whatever comes and never answers."""
    return loopback_server(lambda connection: connection.sendall(greeting) if greeting else None)


def resetting_server() -> contextlib.AbstractContextManager[int]:
    """A server that resets each connection at once (RST)."""

    def reset(connection: socket.socket) -> None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    return loopback_server(reset)
