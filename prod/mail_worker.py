"""The production work unit of a ``prod.run`` worker: the mail pipeline, built from the settings."""

from __future__ import annotations

import os
import socket

from emailops.pipeline import MailPipeline
from emailops.store.database import create_index_engine
from emailops.store.migrations import migrate
from prod.runtime_settings import RuntimeSettings


def create_unit(settings: RuntimeSettings, worker_id: int) -> MailPipeline:
    """Open the index (migrating it if needed) and build this worker's pipeline."""
    engine = create_index_engine(settings.index_db_url)
    migrate(engine)
    owner = f"{socket.gethostname()}:{os.getpid()}:w{worker_id}"
    return MailPipeline(
        engine,
        settings.imap_config(),
        settings.sync_config(),
        owner=owner,
        workers=settings.workers,
    )
