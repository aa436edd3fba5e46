"""A worker target for the poison-message tests: the real mail pipeline, whose rules stage hangs
for ever on a message whose subject contains "poison" (as Python's re did on a hostile pattern)."""

from __future__ import annotations

import time
from typing import Any

from emailops.pipeline import MailPipeline
from emailops.replies import decisions
from prod import mail_worker
from prod.runtime_settings import RuntimeSettings


def create_unit(settings: RuntimeSettings, worker_id: int) -> MailPipeline:
    real = decisions.apply_rules

    def hanging_on_poison(conn: Any, **kwargs: Any) -> Any:
        if "poison" in kwargs["parsed"].subject:
            time.sleep(3600)
        return real(conn, **kwargs)

    decisions.apply_rules = hanging_on_poison
    return mail_worker.create_unit(settings, worker_id)
