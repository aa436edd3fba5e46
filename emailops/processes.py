"""Who a process is (the owner of a lease or a claim), and whether a process still exists."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists, also when it belongs to another user (we may not signal it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_run_id() -> str:
    """A random id for one start of a supervisor (or of a one-off command)."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class ProcessIdentity:
    """The owner of folder leases and work claims, unique to one start of one process.

    ``host:run:pid:wN``. Containers of one service may share a host name, and after a restart
    process ids repeat, so neither tells processes apart; ``run`` is drawn at random when the
    supervisor starts and shared by its workers. Processes of one run share one process-id space,
    which is what makes probing another's pid meaningful (``names_dead_sibling``).
    """

    host: str
    run: str
    pid: int
    worker: int

    @classmethod
    def of_this_process(cls, worker: int, run: str) -> ProcessIdentity:
        return cls(socket.gethostname(), run, os.getpid(), worker)

    @classmethod
    def parse(cls, text: str) -> ProcessIdentity | None:
        """The identity ``text`` names, or None for any other form (e.g. an older release's)."""
        parts = text.rsplit(":", 3)
        if len(parts) != 4 or not parts[2].isdigit() or not parts[3].startswith("w"):
            return None
        worker = parts[3].removeprefix("w")
        return cls(parts[0], parts[1], int(parts[2]), int(worker)) if worker.isdigit() else None

    def __str__(self) -> str:
        return f"{self.host}:{self.run}:{self.pid}:w{self.worker}"

    def names_dead_sibling(self, other: str) -> bool:
        """True when ``other`` is a process of this same run (this host, this supervisor start) that
        no longer exists: what it held can be taken over at once, with no wait for it to expire."""
        theirs = ProcessIdentity.parse(other)
        return (
            theirs is not None
            and (theirs.host, theirs.run) == (self.host, self.run)
            and theirs.pid != self.pid
            and not pid_alive(theirs.pid)
        )


def is_dead_sibling(mine: str, other: str, dead_runs: tuple[str, ...] = ()) -> bool:
    """``ProcessIdentity.names_dead_sibling`` for owners as stored (False when ``mine`` is not an
    identity of this form, e.g. a one-off command's), or ``other`` is of this host and one of
    ``dead_runs`` (the supervisor's previous start in this container, known to be over)."""
    me = ProcessIdentity.parse(mine)
    if me is None:
        return False
    theirs = ProcessIdentity.parse(other)
    if theirs is not None and theirs.host == me.host and theirs.run in dead_runs:
        return True
    return me.names_dead_sibling(other)
