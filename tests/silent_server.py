"""A loopback server that accepts connections and then says nothing (or only its greeting): a
frozen mail server, a firewall that drops packets after the handshake, a proxy whose backend hangs."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def silent_server(greeting: bytes = b"") -> Iterator[int]:
    """Yield the port of a server that sends ``greeting`` (nothing by default) on each connection,
    then reads whatever comes and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            connection, _ = listener.accept()
            connections.append(connection)
            if greeting:
                connection.sendall(greeting)

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
