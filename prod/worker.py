"""A worker process: build one work unit, then run it in bounded steps until told to stop.

Contract with the unit (the mail pipeline implements it in ``prod.mail_worker``)::

    factory(settings: RuntimeSettings, worker_id: int) -> WorkUnit     # "module:callable"
    unit.run_once()   # one bounded unit of work, returns within ~1-2 s
    unit.close()      # release connections; called once on a graceful stop
    unit.status()     # optional: what each watched folder last saw (emailops.imap.watcher.FolderStatus),
                      # written to STATE_DIR/worker-<n>.json about every second (prod.worker_status)
    unit.smtp_status()  # optional, with status(): its SMTP sign-ins (SmtpSignInStatus, or None)

A unit that blocks on a server marks the call (``emailops.network_waits.WAITS.waiting``); while
such a call is in its bound, a thread of the worker beats for the loop (and writes the status with
what it waits for), so only a loop stuck elsewhere, or in a call past its bound, looks hung.

With ``METRICS_PORT`` set, ``emailops.metrics`` is enabled before the unit is built: the values go to
the supervisor's prometheus-client multiprocess directory (PROMETHEUS_MULTIPROC_DIR, inherited).

Lifecycle and exit codes:
- the factory raising is a boot failure: logged, exit ``EXIT_BOOT_FAILURE`` (3); the supervisor
  counts these and gives up after a few in a row instead of crash-looping;
- ``run_once`` raising is logged (and sent to Sentry); the loop goes on after a backoff that grows
  with consecutive failures, heartbeating meanwhile, so a broken server is not hammered;
- the loop stops between two ``run_once`` calls, never inside one, when the supervisor sets the stop
  event, when this process gets SIGTERM, or when the supervisor is gone (parent pid changed).
  SIGINT is ignored: Ctrl-C reaches the whole process group and the supervisor decides.
- once the loop has ended the worker sets ``exiting``: the supervisor gives a worker that finished
  its unit the time to close it and exit, up to ``SHUTDOWN_TIMEOUT_SECONDS``, even on Ctrl-C;
- a worker whose supervisor died and whose current unit does not return within
  ``SHUTDOWN_TIMEOUT_SECONDS`` exits hard (``EXIT_ORPHANED``) instead of running forever.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tenacity import wait_exponential

from emailops.backoff import delay_seconds
from emailops.network_waits import WAITS

if TYPE_CHECKING:
    from prod.runtime_settings import RuntimeSettings

DEFAULT_WORKER_TARGET = "prod.mail_worker:create_unit"
# Set by the supervisor in its workers' environment: the random id of its start, which makes the
# identity of each worker process unique (``emailops.processes.ProcessIdentity``).
RUN_ID_ENV = "EMAILOPS_RUN_ID"
# The run ids of the supervisor's earlier starts with this STATE_DIR (comma-separated), set only
# when the last is known to be over (its state file is gone or stale): their leases and claims are
# taken at once.
PREVIOUS_RUN_ID_ENV = "EMAILOPS_PREVIOUS_RUN_ID"

EXIT_OK = 0
EXIT_BOOT_FAILURE = 3
EXIT_ORPHANED = 4

# After a failed iteration: 1 s, doubling, at most 30 s.
ERROR_BACKOFF = wait_exponential(multiplier=1.0, max=30.0)
# Sleeps are cut into slices this long, so that stop requests and heartbeats are never late.
_SLICE_SECONDS = 0.25
# How often the waiting-beat thread looks whether the loop waits on a server.
WAIT_BEAT_INTERVAL_SECONDS = 0.5
# How often a worker collects its garbage and hands the memory malloc holds free back to the
# system (see _FreedMemoryTrim).
MALLOC_TRIM_INTERVAL_SECONDS = 60.0


class WorkUnit(Protocol):
    def run_once(self) -> None: ...

    def close(self) -> None: ...


WorkUnitFactory = Callable[["RuntimeSettings", int], WorkUnit]


def load_factory(target: str) -> WorkUnitFactory:
    """Import ``"package.module:callable"``."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"worker target must look like 'package.module:callable', not {target!r}")
    factory = getattr(importlib.import_module(module_name), attribute)
    if not callable(factory):
        raise TypeError(f"worker target {target!r} is not callable")
    return factory  # type: ignore[no-any-return]


def error_backoff_seconds(consecutive_failures: int) -> float:
    if consecutive_failures <= 0:
        return 0.0
    return delay_seconds(ERROR_BACKOFF, consecutive_failures)


class WorkerLoop:
    """The worker's loop; ``run_iteration`` is one step, callable from tests with fakes."""

    def __init__(
        self,
        unit: WorkUnit,
        *,
        beat: Callable[[], None],
        stop_requested: Callable[[], bool],
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        log: Any,
    ) -> None:
        self.unit = unit
        self._beat = beat
        self._stop_requested = stop_requested
        self._sleep = sleep
        self._clock = clock
        self._log = log
        self.consecutive_failures = 0

    def run_iteration(self) -> None:
        try:
            self.unit.run_once()
        except Exception:
            self.consecutive_failures += 1
            delay = error_backoff_seconds(self.consecutive_failures)
            self._log.exception(
                "work unit failed", consecutive_failures=self.consecutive_failures, retry_in_seconds=delay
            )
            self._pause(delay)
        else:
            self.consecutive_failures = 0
        self._beat()

    def _pause(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while not self._stop_requested():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            self._beat()
            self._sleep(min(remaining, _SLICE_SECONDS))

    def run(self) -> None:
        while not self._stop_requested():
            self.run_iteration()


@dataclass
class WorkerSpec:
    """Everything a worker process gets from the supervisor (pickled by the spawn start method)."""

    worker_id: int
    target: str
    settings: RuntimeSettings
    # Shared flag (multiprocessing RawValue): set by the supervisor to ask for a stop.
    stop_requested: Any
    # Shared double (multiprocessing RawValue): time.monotonic() of the last beat, 0.0 until booted.
    heartbeat: Any
    # Shared flag (multiprocessing RawValue): set once the loop has ended, the unit finished; what
    # is left is closing it and exiting, which the supervisor waits for even on a quick stop.
    exiting: Any
    log_channel: Connection | None


class _StopFlags:
    """Why the loop should stop. Signal handlers only set a flag; the loop reads them."""

    def __init__(self, stop_requested: Any, parent_pid: int) -> None:
        self._stop_requested = stop_requested
        self._parent_pid = parent_pid
        self.terminated = False

    @property
    def orphaned(self) -> bool:
        return os.getppid() != self._parent_pid

    def __call__(self) -> bool:
        return self.terminated or self.orphaned or bool(self._stop_requested.value)


class _StatusWriter:
    """Writes the unit's status, when it reports one, at most every STATUS_WRITE_INTERVAL_SECONDS.

    Called by the loop (``from_unit``: the unit's folders and SMTP sign-ins are asked again) and by
    the thread that beats while the loop waits on a server (the last reports from the unit, the
    waits now): the unit is only ever asked from its own thread."""

    def __init__(self, state_dir: Path, worker_id: int, unit: object, unit_thread: int, log: Any) -> None:
        self._state_dir = state_dir
        self._worker_id = worker_id
        self._status: Callable[[], list[Any]] | None = getattr(unit, "status", None)
        self._smtp_status: Callable[[], Any] = getattr(unit, "smtp_status", lambda: None)
        self._unit_thread = unit_thread
        self._log = log
        self._started_at = time.time()
        self._next_write = 0.0
        self._failing = False
        self._folders: list[Any] = []
        self._smtp: Any = None
        self._lock = threading.Lock()

    def __call__(self, *, from_unit: bool = True) -> None:
        from prod.worker_status import (
            STATUS_WRITE_INTERVAL_SECONDS,
            FolderReport,
            SmtpReport,
            WaitReport,
            WorkerStatus,
            write_status,
        )

        with self._lock:
            now = time.monotonic()
            if self._status is None or now < self._next_write:
                return
            self._next_write = now + STATUS_WRITE_INTERVAL_SECONDS
            if from_unit:
                self._folders = [FolderReport(**dataclasses.asdict(folder)) for folder in self._status()]
                smtp = self._smtp_status()
                self._smtp = None if smtp is None else SmtpReport(**dataclasses.asdict(smtp))
            waiting = WAITS.in_flight(self._unit_thread)
            status = WorkerStatus(
                worker=self._worker_id,
                pid=os.getpid(),
                started_at=self._started_at,
                updated_at=time.time(),
                folders=self._folders,
                smtp=self._smtp,
                waiting=None
                if waiting is None
                else WaitReport(waiting.service, waiting.endpoint, waiting.since),
                not_answering=[
                    WaitReport(silence.service, silence.endpoint, silence.since)
                    for silence in WAITS.silences()
                ],
            )
            try:
                write_status(self._state_dir, status)
            except OSError as exc:
                if not self._failing:  # once, not every second
                    self._log.warning("writing the worker status failed", error=str(exc))
                self._failing = True
            else:
                self._failing = False


def _beat_while_waiting(
    unit_thread: int, beat: Callable[[], None], stopped: threading.Event, interval: float
) -> None:
    """Beat for the loop while it waits on a server, within the bound of the call it waits in: a
    worker whose folders time out one after another against a frozen server is alive. A loop stuck
    anywhere else, or in a call past its bound, gets no beat from here and is killed as hung."""
    while not stopped.wait(interval):
        if WAITS.in_flight(unit_thread) is not None:
            beat()


# glibc's mallopt parameter number and the threshold the worker fixes (see fix_mmap_threshold).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def fix_mmap_threshold() -> bool:
    """Keep glibc's malloc at its default mmap threshold (128 KiB) for the worker's life; True if set.

    By default glibc raises the threshold to the size of every mmap'd block freed, up to 32 MiB,
    and the trim threshold to twice that. A worker frees such a block early (CPython's table of
    interned strings, when it doubles), and from then on every buffer below that size (a large
    message, a reply, SQLite's statements) came from the heap and, once freed, stayed there: the
    free memory kept (``mallinfo2().fordblks``) grew in the soak, with nothing in use growing.
    Setting the parameter turns the adjustment off, so such buffers are mapped and given back when
    freed, and the free memory kept stays flat (figures: bench/README.md). Without glibc
    there is no mallopt and nothing is done."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


# Novel strings interned by presize_interned_strings: more than a 65,536-slot table can take
# (43,690), so that it must resize once; dropped every thousand, so that it resizes for what the
# worker holds, not for them.
_PRESIZE_INTERNED = 50_000
_PRESIZE_BATCH = 1_000


def presize_interned_strings() -> None:
    """Resize CPython's table of interned strings now, to the size the worker's own strings need.

    The table (a dict) is resized only when an insertion finds no free slot, to 3 times the strings
    alive then, rounded up to a power of 2. A built worker holds about 40,000 (measured), in a
    65,536-slot table whose free slots a few new names a minute use up: it doubled to 131,072
    slots (1.9 MB) once, between minute 10 and 56 of a soak (bench/README.md). Interning 50,000
    short-lived strings makes that resize happen at start-up instead, sized by what is alive."""
    batch: list[str] = []
    for n in range(_PRESIZE_INTERNED):
        batch.append(sys.intern(f"emailops-presize-{n}"))
        if len(batch) == _PRESIZE_BATCH:
            batch.clear()


class _FreedMemoryTrim:
    """Gives the pages glibc's malloc keeps free back to the system, at most every
    MALLOC_TRIM_INTERVAL_SECONDS.

    glibc returns freed memory to the system only from the top of its heap: a free page below a
    block still in use stays resident. Under steady mail a worker's heap (SQLite, message parsing,
    composing replies) is freed in a new pattern each time, and the pages kept free grew steadily
    in the soak (``mallinfo2().fordblks``; figures: bench/README.md), with nothing leaked.
    ``malloc_trim(0)`` releases every whole free page of every arena (madvise), cheaply on a
    worker's heap. Without glibc (musl) there is no such function and only the collection is done.

    A full collection comes first: CPython collects its oldest generation only once the objects
    promoted since the last one reach a quarter of those that survived it (about 100,000 in a
    worker): none came in the first 27 minutes of a soak, while the cycles answered messages leave
    there (1,000-4,000 blocks a minute) held their pages and RSS rose (bench/README.md)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._malloc_trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
        self._clock = clock
        self._next = clock() + MALLOC_TRIM_INTERVAL_SECONDS

    def __call__(self) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + MALLOC_TRIM_INTERVAL_SECONDS
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)


def _watch_parent(flags: _StopFlags, grace_seconds: float, log: Any) -> None:
    while not flags.orphaned:
        time.sleep(0.5)
    log.warning("supervisor is gone; stopping", grace_seconds=grace_seconds)
    time.sleep(grace_seconds)
    log.error("supervisor is gone and the current unit did not finish; exiting")
    os._exit(EXIT_ORPHANED)


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (``multiprocessing`` target)."""
    from prod.error_tracking import flush_error_tracking, init_error_tracking
    from prod.logging_setup import configure_logging, get_logger

    flags = _StopFlags(spec.stop_requested, os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: setattr(flags, "terminated", True))

    pipeline = configure_logging(
        spec.settings, process_role="worker", worker=spec.worker_id, queue=spec.log_channel
    )
    init_error_tracking(spec.settings, worker=spec.worker_id)
    log = get_logger("worker", worker=spec.worker_id)
    threading.Thread(
        target=_watch_parent,
        args=(flags, spec.settings.shutdown_timeout_seconds, log),
        name="parent-watch",
        daemon=True,
    ).start()

    exit_code = EXIT_OK
    try:
        if spec.settings.metrics_port is not None:
            from emailops import metrics

            metrics.enable()
        try:
            unit = load_factory(spec.target)(spec.settings, spec.worker_id)
        except Exception as exc:
            # The cause on one line beside the traceback, for whoever filters on error_type.
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.exception(
                "worker failed to boot", target=spec.target, error=cause, error_type=type(exc).__name__
            )
            exit_code = EXIT_BOOT_FAILURE
            return
        unit_thread = threading.get_ident()
        write_status = _StatusWriter(spec.settings.state_dir, spec.worker_id, unit, unit_thread, log)
        fix_mmap_threshold()
        presize_interned_strings()
        trim = _FreedMemoryTrim()

        def beat() -> None:
            spec.heartbeat.value = time.monotonic()
            write_status()
            trim()

        def beat_while_waiting() -> None:
            spec.heartbeat.value = time.monotonic()
            write_status(from_unit=False)

        beat()
        waits_watched = threading.Event()
        threading.Thread(
            target=_beat_while_waiting,
            args=(unit_thread, beat_while_waiting, waits_watched, WAIT_BEAT_INTERVAL_SECONDS),
            name="wait-beat",
            daemon=True,
        ).start()
        log.info("worker started", target=spec.target)
        try:
            WorkerLoop(unit, beat=beat, stop_requested=flags, log=log).run()
        finally:
            waits_watched.set()
            spec.exiting.value = 1
            try:
                unit.close()
            except Exception:
                log.exception("closing the work unit failed")
        reason = (
            "supervisor gone" if flags.orphaned else "SIGTERM" if flags.terminated else "supervisor request"
        )
        log.info("worker stopped", reason=reason)
    except BaseException:
        log.exception("worker crashed")
        exit_code = 1
    finally:
        flush_error_tracking()
        with contextlib.suppress(Exception):
            pipeline.close()
        sys.exit(exit_code)
