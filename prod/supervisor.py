"""The supervisor: keeps ``WORKERS`` worker processes alive, stops them gracefully, gives up loudly.

Each worker slot moves through states as data (after supervisord)::

    STARTING --booted (first heartbeat)--> RUNNING
    STARTING --died / hung-------------> BACKOFF --delay--> STARTING      (boot failure n < limit)
    STARTING --died, n-th in a row------> FATAL   -> the supervisor stops everything, exit 3
    RUNNING  --died / hung (killed)-----> BACKOFF --delay--> STARTING      (delay grows while deaths
                                                                            come quickly)
    any      --stop requested-----------> STOPPING --exited / killed at the deadline--> EXITED

Signal handlers only record the signal (``request_stop``); ``loop_once`` does the work: it is one
iteration, testable with an injected clock. SIGTERM gives workers ``SHUTDOWN_TIMEOUT_SECONDS`` to
finish their current unit, then kills them; SIGINT gives them ``QUICK_STOP_SECONDS`` to finish it
(a worker that has finished its unit and is exiting gets up to ``SHUTDOWN_TIMEOUT_SECONDS``); a second
signal kills at once, unless it came within ``REPEATED_SIGNAL_SECONDS`` of the first (the same
request delivered twice). A worker whose heartbeat is older than ``HEARTBEAT_TIMEOUT_SECONDS`` (or that
has not booted within it) is killed and replaced; one waiting on a mail server beats meanwhile
(``prod.worker``), so a frozen server gets no worker killed.

With ``console_socket`` (``WEB_PORT``) one more slot runs the operator console
(``prod.console.server``) on that socket, restarted like a worker; but the mail work never depends
on it: a console that fails to boot is retried at the longest delay, never FATAL, and it counts in
no worker figure.
"""

from __future__ import annotations

import enum
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from tenacity import wait_exponential

from emailops.backoff import delay_seconds
from emailops.processes import new_run_id
from prod import heartbeat as state_file
from prod import worker_status
from prod.console.server import ConsoleSpec, console_main
from prod.logging_setup import LogCollector, get_logger
from prod.metrics_endpoint import Figures, MetricsEndpoint
from prod.worker import EXIT_BOOT_FAILURE, PREVIOUS_RUN_ID_ENV, RUN_ID_ENV, WorkerSpec, worker_main

if TYPE_CHECKING:
    from prod.runtime_settings import RuntimeSettings

EXIT_OK = 0
EXIT_FATAL = 3
QUICK_STOP_SECONDS = 1.0
# A stop signal this soon after the first is the same request delivered twice, not an operator
# asking again: `timeout`, `kill -- -PGID` and a terminal's Ctrl-C reach the whole process group
# while a parent (the demo, a wrapper script) forwards the request a moment later.
REPEATED_SIGNAL_SECONDS = 1.0
LOOP_INTERVAL_SECONDS = 0.2
CONSOLE_SLOT_ID = 0


class SlotState(enum.StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


@dataclass(frozen=True)
class RestartPolicy:
    """Restart delays: ``base * 2**(n-1)`` capped at ``max``, n = consecutive failures.

    ``max_boot_failures`` failures to boot in a row make the slot FATAL. A running worker that dies
    after ``stable_after_seconds`` of life starts a new series (its next delay is ``base``).
    """

    base_delay_seconds: float = 0.5
    max_delay_seconds: float = 30.0
    max_boot_failures: int = 4
    stable_after_seconds: float = 10.0

    def delay(self, consecutive_failures: int) -> float:
        strategy = wait_exponential(multiplier=self.base_delay_seconds, max=self.max_delay_seconds)
        return delay_seconds(strategy, consecutive_failures)


@dataclass
class WorkerSlot:
    worker_id: int
    state: SlotState = SlotState.BACKOFF
    process: BaseProcess | None = None
    stop_requested: Any = None  # multiprocessing RawValue("b"): 1 once the supervisor asks for a stop
    heartbeat: Any = None  # multiprocessing RawValue("d"): monotonic time of the last beat, 0 = not booted
    exiting: Any = None  # multiprocessing RawValue("b"): 1 once the worker's loop has ended
    started_at: float = 0.0
    next_start_at: float = 0.0
    boot_failures: int = 0
    quick_deaths: int = 0
    kill_reason: str | None = None

    @property
    def label(self) -> int | str:
        """How logs name the slot: the worker's number, or ``console``."""
        return "console" if self.worker_id == CONSOLE_SLOT_ID else self.worker_id

    @property
    def booted(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.value > 0

    @property
    def exiting_cleanly(self) -> bool:
        return self.exiting is not None and bool(self.exiting.value)

    def last_sign_of_life(self) -> float:
        return self.heartbeat.value if self.booted else self.started_at


@dataclass
class _StopRequest:
    signum: int
    received_at: float
    # Workers still in their unit are killed at ``deadline``; those exiting at ``exit_deadline``.
    deadline: float
    exit_deadline: float


@dataclass
class Supervisor:
    settings: RuntimeSettings
    target: str
    log_collector: LogCollector | None = None
    # The /metrics endpoint (METRICS_PORT), started before the first worker is spawned.
    metrics: MetricsEndpoint | None = None
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    # The operator console's listening socket (WEB_PORT), bound before; None: no console.
    console_socket: socket.socket | None = None
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        # Inherited by every worker this supervisor spawns (spawn copies the environment).
        self.run_id = os.environ[RUN_ID_ENV] = new_run_id()
        self._log = get_logger("supervisor")
        self.slots = [WorkerSlot(worker_id=n) for n in range(1, self.settings.workers + 1)]
        self.console = None if self.console_socket is None else WorkerSlot(worker_id=CONSOLE_SLOT_ID)
        self._pending_signals: list[tuple[int, float]] = []  # (signal, when it arrived)
        self._stop: _StopRequest | None = None
        self._fatal = False
        self._last_state_write = float("-inf")
        self._started_wall = self.wall_clock()
        self.restarts: dict[str, int] = {}  # reason -> workers restarted for it (for the metrics)
        self.exit_code: int | None = None

    def all_slots(self) -> list[WorkerSlot]:
        """The workers' slots and the console's."""
        return self.slots if self.console is None else [*self.slots, self.console]

    # Called from signal handlers: record only.
    def request_stop(self, signum: int, _frame: object = None) -> None:
        self._pending_signals.append((signum, self.clock()))

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        worker_status.remove_all(self.settings.state_dir)  # a former run's workers
        over = state_file.previous_runs_over(self.settings.state_dir, self.run_id, self.wall_clock())
        if over:
            # Leases and claims of earlier starts (killed, or the container restarted) are free.
            os.environ[PREVIOUS_RUN_ID_ENV] = ",".join(over)
        self._log.info(
            "supervisor started", workers=self.settings.workers, target=self.target, run=self.run_id
        )
        try:
            while self.exit_code is None:
                self.loop_once()
                if self.exit_code is None:
                    time.sleep(LOOP_INTERVAL_SECONDS)
        finally:
            self._kill_all("supervisor exiting")
            state_file.remove_state(self.settings.state_dir)
            worker_status.remove_all(self.settings.state_dir)
        self._log.info("supervisor stopped", exit_code=self.exit_code)
        return self.exit_code

    def loop_once(self) -> None:
        """One iteration: handle signals, reap, kill the hung, start the due, write the state."""
        now = self.clock()
        self._handle_signals(now)
        for slot in self.all_slots():
            self._reap(slot, now)
        if self._stop is None:
            for slot in self.all_slots():
                self._kill_if_hung(slot, now)
                if slot.state is SlotState.BACKOFF and now >= slot.next_start_at:
                    self._spawn(slot, now)
        else:
            self._advance_stop(now)
        if (
            now - self._last_state_write >= state_file.STATE_WRITE_INTERVAL_SECONDS
            or self.exit_code is not None
        ):
            self._write_state(now)
        if self.metrics is not None:
            self.metrics.update(self._figures())

    # -- signals and stopping

    def _handle_signals(self, now: float) -> None:
        while self._pending_signals:
            signum, received_at = self._pending_signals.pop(0)
            name = signal.Signals(signum).name
            if self._stop is not None:
                if received_at - self._stop.received_at < REPEATED_SIGNAL_SECONDS:
                    self._log.info("stop signal repeated; already stopping", signal=name)
                    continue
                self._log.warning("second stop signal: killing workers now", signal=name)
                self._stop.deadline = self._stop.exit_deadline = now
                continue
            grace = self.settings.shutdown_timeout_seconds
            if signum == signal.SIGINT:
                grace = min(QUICK_STOP_SECONDS, grace)
            self._log.info("stopping workers", signal=name, grace_seconds=grace)
            self._begin_stop(signum, received_at, now, grace)

    def _begin_stop(self, signum: int, received_at: float, now: float, grace: float) -> None:
        self._stop = _StopRequest(
            signum=signum,
            received_at=received_at,
            deadline=now + grace,
            exit_deadline=now + max(grace, self.settings.shutdown_timeout_seconds),
        )
        for slot in self.all_slots():
            if slot.stop_requested is not None:
                slot.stop_requested.value = 1
            if slot.state in (SlotState.STARTING, SlotState.RUNNING):
                slot.state = SlotState.STOPPING
            elif slot.state is SlotState.BACKOFF:
                slot.state = SlotState.EXITED

    def _advance_stop(self, now: float) -> None:
        assert self._stop is not None
        alive = [slot for slot in self.all_slots() if slot.state is SlotState.STOPPING]
        overdue = [
            slot
            for slot in alive
            if now >= (self._stop.exit_deadline if slot.exiting_cleanly else self._stop.deadline)
        ]
        if overdue:
            for slot in overdue:
                self._log.warning("worker did not stop in time; killing", worker=slot.label)
                self._kill(slot)
                self._reap(slot, now, wait_seconds=1.0)
            alive = [slot for slot in self.all_slots() if slot.state is SlotState.STOPPING]
        if not alive:
            self.exit_code = EXIT_FATAL if self._fatal else EXIT_OK

    # -- processes

    def _spawn(self, slot: WorkerSlot, now: float) -> None:
        # Shared memory, not an Event: an Event is named semaphores in /dev/shm, which outlive a
        # kill -9 of the whole process group (the resource tracker that unlinks them dies too).
        slot.stop_requested = self._context.RawValue("b", 0)
        slot.heartbeat = self._context.RawValue("d", 0.0)
        slot.exiting = self._context.RawValue("b", 0)
        channel = self.log_collector.open_channel() if self.log_collector is not None else None
        if slot is self.console:
            assert self.console_socket is not None
            console = ConsoleSpec(
                settings=self.settings,
                sock=self.console_socket,
                stop_requested=slot.stop_requested,
                heartbeat=slot.heartbeat,
                exiting=slot.exiting,
                log_channel=channel,
            )
            process = self._context.Process(target=console_main, args=(console,), name="emailops-console")
        else:
            spec = WorkerSpec(
                worker_id=slot.worker_id,
                target=self.target,
                settings=self.settings,
                stop_requested=slot.stop_requested,
                heartbeat=slot.heartbeat,
                exiting=slot.exiting,
                log_channel=channel,
            )
            process = self._context.Process(
                target=worker_main, args=(spec,), name=f"emailops-worker-{slot.worker_id}"
            )
        process.start()
        if channel is not None:
            # The child holds its own copy now; ours must go, or the collector never sees EOF.
            channel.close()
        slot.process = process
        slot.state = SlotState.STARTING
        slot.started_at = now
        slot.kill_reason = None
        self._log.info("worker spawned", worker=slot.label, worker_pid=process.pid)

    def _kill(self, slot: WorkerSlot) -> None:
        if slot.process is not None and slot.process.is_alive():
            slot.process.kill()

    def _kill_all(self, reason: str) -> None:
        for slot in self.all_slots():
            if slot.process is not None and slot.process.is_alive():
                self._log.warning("killing worker", worker=slot.label, reason=reason)
                slot.process.kill()
                slot.process.join(timeout=2)

    def _kill_if_hung(self, slot: WorkerSlot, now: float) -> None:
        if slot.state is SlotState.STARTING and slot.booted:
            slot.state = SlotState.RUNNING
            self._log.info("worker running", worker=slot.label)
        if slot.state not in (SlotState.STARTING, SlotState.RUNNING) or slot.kill_reason:
            return
        silent_for = now - slot.last_sign_of_life()
        if silent_for > self.settings.heartbeat_timeout_seconds:
            slot.kill_reason = "no heartbeat" if slot.booted else "did not boot in time"
            self._log.error(
                "worker is hung; killing it",
                worker=slot.label,
                worker_pid=slot.process.pid if slot.process is not None else None,
                reason=slot.kill_reason,
                silent_seconds=round(silent_for, 1),
            )
            self._kill(slot)

    def _reap(self, slot: WorkerSlot, now: float, wait_seconds: float = 0.0) -> None:
        process = slot.process
        if process is None:
            return
        if wait_seconds:
            process.join(wait_seconds)
        if process.is_alive():
            return
        exit_code = process.exitcode
        booted = slot.booted
        if self.metrics is not None and process.pid is not None:
            self.metrics.worker_gone(process.pid)
        process.close()
        slot.process = None
        if slot.state is SlotState.STOPPING or self._stop is not None:
            slot.state = SlotState.EXITED
            self._log.info("worker exited", worker=slot.label, exit_code=exit_code)
            return
        if not booted or exit_code == EXIT_BOOT_FAILURE:
            self._after_boot_failure(slot, now, exit_code)
        else:
            self._after_death(slot, now, exit_code)

    def _after_boot_failure(self, slot: WorkerSlot, now: float, exit_code: int | None) -> None:
        slot.boot_failures += 1
        if slot is self.console:
            # The mail work goes on without the console; it is tried again, slowly.
            delay = self.policy.delay(slot.boot_failures)
            self._log.error("console failed to boot; retrying", exit_code=exit_code, retry_in_seconds=delay)
            self._backoff(slot, now, delay)
            return
        self._count_restart("boot_failure")
        if slot.boot_failures >= self.policy.max_boot_failures:
            slot.state = SlotState.FATAL
            self._fatal = True
            self._log.critical(
                "worker failed to boot repeatedly; giving up",
                worker=slot.worker_id,
                exit_code=exit_code,
                boot_failures=slot.boot_failures,
            )
            self._begin_stop(signal.SIGTERM, now, now, self.settings.shutdown_timeout_seconds)
            return
        delay = self.policy.delay(slot.boot_failures)
        self._log.error(
            "worker failed to boot; retrying",
            worker=slot.worker_id,
            exit_code=exit_code,
            boot_failures=slot.boot_failures,
            retry_in_seconds=delay,
        )
        self._backoff(slot, now, delay)

    def _after_death(self, slot: WorkerSlot, now: float, exit_code: int | None) -> None:
        slot.boot_failures = 0
        if now - slot.started_at >= self.policy.stable_after_seconds:
            slot.quick_deaths = 0
        slot.quick_deaths += 1
        if slot is not self.console:
            self._count_restart("hung" if slot.kill_reason else "died")
        delay = self.policy.delay(slot.quick_deaths)
        self._log.error(
            "worker died; restarting",
            worker=slot.label,
            exit_code=exit_code,
            reason=slot.kill_reason or "exited",
            retry_in_seconds=delay,
        )
        self._backoff(slot, now, delay)

    def _backoff(self, slot: WorkerSlot, now: float, delay: float) -> None:
        slot.state = SlotState.BACKOFF
        slot.next_start_at = now + delay
        slot.stop_requested = None
        slot.heartbeat = None
        slot.exiting = None

    def _count_restart(self, reason: str) -> None:
        self.restarts[reason] = self.restarts.get(reason, 0) + 1

    # -- what the healthcheck and the metrics read

    def _figures(self) -> Figures:
        return Figures(
            started_at=self._started_wall,
            workers_expected=self.settings.workers,
            workers_up=sum(1 for slot in self.slots if slot.state is SlotState.RUNNING),
            worker_pids={
                slot.worker_id: slot.process.pid
                for slot in self.slots
                if slot.process is not None and slot.process.pid is not None
            },
            restarts=dict(self.restarts),
            console_pid=self.console.process.pid
            if self.console is not None and self.console.process is not None
            else None,
        )

    def _write_state(self, now: float) -> None:
        wall_now = self.wall_clock()
        workers = [
            state_file.WorkerState(
                worker=slot.worker_id,
                pid=slot.process.pid or 0,
                state=str(slot.state),
                last_heartbeat=wall_now - (now - slot.heartbeat.value) if slot.booted else 0.0,
            )
            for slot in self.slots
            if slot.process is not None
        ]
        state = state_file.SupervisorState(
            pid=os.getpid(),
            heartbeat=wall_now,
            expected_workers=self.settings.workers,
            started_at=self._started_wall,
            workers=workers,
        )
        try:
            state_file.write_state(self.settings.state_dir, state)
        except OSError:
            self._log.exception("writing the state file failed", state_dir=str(self.settings.state_dir))
        self._last_state_write = now
