"""The worker target of the crash-consistency harness (``tests/test_crash_consistency.py``).

``crash_unit`` is the production pipeline (``prod.mail_worker.create_unit``) with kill points the
harness arms from outside, so that product code carries no test hook. ``$EMAILOPS_CRASH_DIR`` (read
here only) holds ``armed.json``::

    {"id": 7, "site": "store", "hit": 2, "scope": "worker"}

Once it is armed, the ``hit``-th time one worker process reaches ``site`` it claims the kill point
(renames ``armed.json`` to ``fired-7.json``: atomic, so exactly one process fires it) and SIGKILLs
itself (``scope="worker"``), or its whole process group: the supervisor and every worker at once
(``scope="group"``; the harness starts the supervisor in a session of its own).

Sites, each at a moment that matters to the guarantees (see ``SITES``): a download of a batch, a
batch written but not committed, any commit about to happen, a UIDVALIDITY re-map, flag and
expunge writes, a message's rules decided but not committed, a reply claimed but not sent, and a
reply the SMTP server accepted but that is not yet marked sent.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

from emailops.pipeline import MailPipeline
from prod.mail_worker import create_unit
from prod.runtime_settings import RuntimeSettings

# site -> (module, attribute, "before" or "after" the call). The attribute is the one the product
# code looks up at call time (``module.function``), so that replacing it reaches every caller.
SITES: dict[str, tuple[str, str, str]] = {
    "fetch": ("emailops.imap.download", "fetch_bodies", "before"),  # mid-batch: earlier batches stored
    "store": ("emailops.store.messages", "insert_messages", "after"),  # rows written, not committed
    "resync": ("emailops.store.messages", "remap_uidvalidity", "after"),  # UIDVALIDITY re-map
    "flags": ("emailops.store.messages", "update_flags", "after"),
    "expunge": ("emailops.store.messages", "mark_expunged", "after"),
    "rules": ("emailops.replies.decisions", "apply_rules", "after"),  # decided, not committed
    "send": ("emailops.replies.smtp_sender.SmtpSender", "send", "before"),  # claimed, nothing sent
    "accepted": ("emailops.replies.outbox", "mark_sent", "before"),  # the server said 250
}
# Not in SITES: "commit" fires in the engine's "commit" event, just before any transaction commits.
COMMIT_SITE = "commit"
# Smaller batches than production's 500, so that an initial sync has many batches to be killed in.
FETCH_BATCH_MESSAGES = 25


class KillPoints:
    """Reads the armed kill point when a site is reached and fires it on its ``hit``-th reach."""

    def __init__(self, directory: Path) -> None:
        self.armed = directory / "armed.json"
        self.directory = directory
        self.reached: dict[tuple[int, str], int] = {}

    def reach(self, site: str) -> None:
        try:
            plan = json.loads(self.armed.read_text())
        except (OSError, ValueError):  # nothing armed, or the harness is writing it right now
            return
        if plan["site"] != site:
            return
        key = (plan["id"], site)
        self.reached[key] = self.reached.get(key, 0) + 1
        if self.reached[key] < plan["hit"]:
            return
        fired = self.directory / f"fired-{plan['id']}.json"
        try:
            os.rename(self.armed, fired)
        except FileNotFoundError:  # another worker fired it, or the harness disarmed it
            return
        fired.write_text(json.dumps({**plan, "pid": os.getpid()}))
        if plan["scope"] == "group":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, site: str) -> None:
        module_name, attribute, when = SITES[site]
        owner: Any
        try:
            owner = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a class: "package.module.Class"
            parent, _, class_name = module_name.rpartition(".")
            owner = getattr(importlib.import_module(parent), class_name)
        original: Callable[..., Any] = getattr(owner, attribute)

        @functools.wraps(original)
        def reached(*args: Any, **kwargs: Any) -> Any:
            if when == "before":
                self.reach(site)
            result = original(*args, **kwargs)
            if when == "after":
                self.reach(site)
            return result

        setattr(owner, attribute, reached)


def crash_unit(settings: RuntimeSettings, worker_id: int) -> MailPipeline:
    unit = create_unit(settings, worker_id)
    unit.config = dataclasses.replace(unit.config, fetch_batch_messages=FETCH_BATCH_MESSAGES)
    points = KillPoints(Path(os.environ["EMAILOPS_CRASH_DIR"]))
    for site in SITES:
        points.wrap(site)
    event.listen(unit.engine, "commit", lambda _conn: points.reach(COMMIT_SITE))
    return unit
