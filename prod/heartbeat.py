"""The supervisor's state file in ``STATE_DIR``: what the healthcheck reads.

The supervisor rewrites ``STATE_DIR/supervisor.json`` about every second, atomically (temporary
file in the same directory, then ``os.replace``), so a reader sees the old or the new file, never a
half-written one. Times are wall-clock UNIX seconds, comparable across processes. Standard library
``emailops.processes`` and ``emailops.atomic_file`` only: the healthcheck imports this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from emailops.atomic_file import write_atomically
from emailops.processes import pid_alive

STATE_FILENAME = "supervisor.json"
STATE_WRITE_INTERVAL_SECONDS = 1.0
# The supervisor writes every second; a file older than this means it is hung or gone.
SUPERVISOR_STALE_SECONDS = 10.0


@dataclass(frozen=True)
class WorkerState:
    worker: int
    pid: int
    state: str
    last_heartbeat: float


@dataclass(frozen=True)
class SupervisorState:
    pid: int
    heartbeat: float
    expected_workers: int
    started_at: float
    workers: list[WorkerState] = field(default_factory=list)

    def to_json(self) -> str:
        # Not ``dataclasses.asdict``: it calls ``fields()``, whose ``tuple(generator)`` CPython
        # allocates with 10 slots and then shrinks, and each shrunk tuple ends in the free list of
        # its size when freed. Written every second, that made the supervisor's memory grow until
        # those free lists were full (bench/README.md, "Soak").
        data = {**vars(self), "workers": [vars(worker) for worker in self.workers]}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SupervisorState:
        data = json.loads(text)
        workers = [WorkerState(**worker) for worker in data.pop("workers", [])]
        return cls(workers=workers, **data)


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILENAME


def write_state(state_dir: Path, state: SupervisorState) -> None:
    """Replace the state file atomically."""
    write_atomically(state_path(state_dir), state.to_json())


def read_state(state_dir: Path) -> SupervisorState | None:
    """The last state written, or None if there is none (supervisor never started or stopped)."""
    try:
        text = state_path(state_dir).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return SupervisorState.from_json(text)


def remove_state(state_dir: Path) -> None:
    state_path(state_dir).unlink(missing_ok=True)


RUN_ID_FILENAME = "run_id"
RUNS_REMEMBERED = 20


def previous_runs_over(state_dir: Path, new_run: str, now: float) -> tuple[str, ...]:
    """Record ``new_run`` as this STATE_DIR's supervisor run; return the earlier runs when the last
    one is known to be over: it left no state file (stopped cleanly), or a stale one, or one naming
    a process that is gone (killed) or this very process (a container restarted with the same pid).
    Earlier runs are returned too (newest first, the last ``RUNS_REMEMBERED``): a start killed
    before it took over its predecessor's work leaves that work to the next. Empty when there was
    no previous run, or it may still be alive."""
    path = state_dir / RUN_ID_FILENAME
    try:
        earlier = tuple(path.read_text(encoding="utf-8").split())
    except FileNotFoundError:
        earlier = ()
    state = read_state(state_dir)
    over = (
        state is None
        or now - state.heartbeat > SUPERVISOR_STALE_SECONDS
        or state.pid == os.getpid()
        or not pid_alive(state.pid)
    )
    path.write_text("\n".join((new_run, *earlier)[:RUNS_REMEMBERED]) + "\n", encoding="utf-8")
    return earlier if over else ()
