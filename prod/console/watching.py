"""What the workers report of the folders they watch (IDLE or polling, the last error), read
from their status files as ``prod.healthcheck`` reads them, for the overview."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from emailops.imap.watcher import FolderStatus
from prod import heartbeat, worker_status


def watched_folders(state_dir: Path) -> list[FolderStatus]:
    """The folders each current worker reports; [] when no supervisor runs here."""
    state = heartbeat.read_state(state_dir)
    if state is None:
        return []
    found = []
    for worker in state.workers:
        status = worker_status.read_status(state_dir, worker.worker, worker.pid)
        if status is not None:
            found += [FolderStatus(**dataclasses.asdict(folder)) for folder in status.folders]
    return found
