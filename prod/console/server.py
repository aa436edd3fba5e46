"""The console's process: uvicorn serving ``create_app`` on the socket the supervisor bound.

The supervisor binds ``WEB_ADDR:WEB_PORT`` once (``listen``) and hands the socket to each console
process it starts, so a restart never loses the port. Like a worker, the process beats (from a task
of its event loop: a loop that hangs stops beating and is replaced), stops when the supervisor
asks, on SIGTERM or when the supervisor is gone, and ignores SIGINT (the supervisor decides).
uvicorn runs in a thread of its own, so it installs no signal handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from prod.worker import EXIT_BOOT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from prod.runtime_settings import RuntimeSettings

BEAT_INTERVAL_SECONDS = 0.5
# How long requests in progress get to finish once the console is asked to stop.
GRACEFUL_SECONDS = 5


def listen(settings: RuntimeSettings) -> socket.socket:
    """The console's listening socket; ``OSError`` when the address cannot be bound."""
    assert settings.web_port is not None
    family = socket.AF_INET6 if ":" in settings.web_addr else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for a socket whose
    # proto says TCP (0 does not), and without it each keep-alive response waits ~40 ms (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.web_addr, settings.web_port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@dataclass
class ConsoleSpec:
    """What the console process gets from the supervisor (pickled by the spawn start method)."""

    settings: RuntimeSettings
    sock: socket.socket
    stop_requested: Any  # multiprocessing RawValue("b")
    heartbeat: Any  # multiprocessing RawValue("d"): time.monotonic() of the last beat, 0 until up
    exiting: Any  # multiprocessing RawValue("b")
    log_channel: Connection | None


def console_main(spec: ConsoleSpec) -> None:
    """Entry point of the console process (``multiprocessing`` target)."""
    from prod.error_tracking import flush_error_tracking, init_error_tracking
    from prod.logging_setup import configure_logging, get_logger

    parent = os.getppid()
    terminated = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: terminated.set())
    pipeline = configure_logging(spec.settings, process_role="console", queue=spec.log_channel)
    init_error_tracking(spec.settings, worker=None)
    log = get_logger("console")
    # Booting: the process is up; building the app (imports, the index's migrations) has one
    # heartbeat timeout from here, and the event loop beats from then on.
    spec.heartbeat.value = time.monotonic()
    exit_code = EXIT_OK
    try:
        try:
            server = _build_server(spec)
        except Exception as exc:
            log.exception("console failed to boot", error_type=type(exc).__name__)
            exit_code = EXIT_BOOT_FAILURE
            return

        def stop_wanted() -> bool:
            return terminated.is_set() or bool(spec.stop_requested.value) or os.getppid() != parent

        async def beat() -> None:
            while not stop_wanted():
                spec.heartbeat.value = time.monotonic()
                await asyncio.sleep(BEAT_INTERVAL_SECONDS)
            server.should_exit = True

        async def serve() -> None:
            beating = asyncio.create_task(beat())
            await server.serve(sockets=[spec.sock])
            beating.cancel()

        thread = threading.Thread(target=asyncio.run, args=(serve(),), name="console-http")
        thread.start()
        log.info("console listening", address=f"http://{spec.settings.web_addr}:{spec.settings.web_port}/")
        thread.join()
        spec.exiting.value = 1
        log.info("console stopped")
    except BaseException:
        log.exception("console crashed")
        exit_code = 1
    finally:
        flush_error_tracking()
        with contextlib.suppress(Exception):
            pipeline.close()
        sys.exit(exit_code)


def _build_server(spec: ConsoleSpec) -> Any:
    import uvicorn

    from emailops.clock import utc_now
    from emailops.store.database import create_index_engine
    from emailops.store.migrations import migrate
    from prod.console.app import create_app
    from prod.console.calls import ConsoleContext
    from prod.console.metrics import HttpMetrics

    engine = create_index_engine(spec.settings.index_db_url)
    migrate(engine)
    app = create_app(
        ConsoleContext(settings=spec.settings, engine=engine, clock=utc_now),
        HttpMetrics(enabled=spec.settings.metrics_port is not None),
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,  # the request frame logs each request, with its id
        lifespan="off",
        proxy_headers=bool(spec.settings.web_base_url),
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    return uvicorn.Server(config)
