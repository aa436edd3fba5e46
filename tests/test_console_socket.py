"""The console's listening socket (``prod.console.server.listen``), as uvicorn's event loop uses it."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from localmail.dovecot import free_loopback_port
from prod.console.server import listen
from tests.console_helpers import console_settings


def test_connections_accepted_on_the_console_socket_send_without_delay(tmp_path: Path) -> None:
    # Without TCP_NODELAY a response written in two parts (headers, body) on a kept-alive
    # connection waits for the client's delayed ACK: about 40 ms per request.
    settings = console_settings(
        tmp_path, f"sqlite:///{tmp_path / 'index.db'}", web_port=free_loopback_port(), web_addr="127.0.0.1"
    )
    sock = listen(settings)
    nodelay: list[int] = []

    async def serve() -> None:
        accepted = asyncio.Event()

        class Noting(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                nodelay.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                accepted.set()

        server = await asyncio.get_running_loop().create_server(Noting, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            await asyncio.wait_for(accepted.wait(), 10)
            writer.close()

    asyncio.run(serve())
    assert nodelay and nodelay[0] != 0
