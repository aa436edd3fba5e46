"""A rule that moves mail to a folder the server does not have, with the real daemon (python -m
prod.run, two workers) and Dovecot: one WARNING per missing folder per load of the rules, before
any mail; a folder whose rule says ``create = true`` is created and the rule's moves work."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from localmail.dovecot import LocalDovecot
from tests.index_helpers import ALICE, daemon_env, first_synced, message
from tests.shell_workers import REPO_ROOT, SupervisorProcess, wait_until

pytestmark = pytest.mark.timeout(180)

RULES = """
[[rules]]
name = "invoices-to-accounting"
[rules.match]
subject = "invoice"
[rules.actions]
move = "Accounting"

[[rules]]
name = "receipts-to-archive"
[rules.match]
subject = "receipt"
[rules.actions]
move = { folder = "Archive", create = true }
"""
MISSING = "the rules move mail to a folder the server does not have"
FAILED = "mailbox change asked by a rule failed"


def _count(supervisor: SupervisorProcess, text: str) -> int:
    return sum(record["message"] == text for record in supervisor.records())


def _missing_warnings(supervisor: SupervisorProcess) -> list[dict[str, Any]]:
    return [record for record in supervisor.records() if record["message"].startswith(MISSING)]


def _folders(dovecot: LocalDovecot) -> set[str]:
    with dovecot.imap(ALICE) as client:
        return {name for _flags, _delimiter, name in client.list_folders()}


def test_a_missing_move_folder_is_one_warning_per_load_or_created(
    dovecot: LocalDovecot, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    env = daemon_env(dovecot, tmp_path, PYTHONPATH=str(REPO_ROOT), WORKERS="2", POLL_INTERVAL_SECONDS="1")
    with SupervisorProcess(tmp_path, env) as supervisor:
        # Before any mail: the folder to create is there, the missing one is told once, though
        # both workers loaded the rules.
        assert wait_until(lambda: "Archive" in _folders(dovecot), 60), supervisor.stdout_lines()[-20:]
        assert wait_until(lambda: _missing_warnings(supervisor), 30), supervisor.stdout_lines()[-20:]
        assert wait_until(lambda: _count(supervisor, "rules loaded") == 2, 30)
        (warning,) = _missing_warnings(supervisor)
        assert warning["level"] == "WARNING" and warning["folder"] == "Accounting"
        assert warning["rules"] == ["invoices-to-accounting"]
        assert "Accounting" not in _folders(dovecot)
        created = [r for r in supervisor.records() if r["message"].startswith("created the folder")]
        assert [(r["folder"], r["rules"]) for r in created] == [("Archive", ["receipts-to-archive"])]

        # The created folder works: the receipt (new mail, after the first sync) is moved there.
        assert wait_until(lambda: first_synced(env["INDEX_DB_URL"]), 30)
        dovecot.deliver(ALICE, message(1, subject="your receipt"))
        assert wait_until(lambda: dovecot.folder_status(ALICE, "Archive")["messages"] == 1, 60)

        # The moves to the missing folder fail per message, as before, with no more warnings.
        dovecot.deliver(ALICE, message(2, subject="invoice 1"))
        dovecot.deliver(ALICE, message(3, subject="invoice 2"))
        assert wait_until(lambda: _count(supervisor, FAILED) == 2, 60)
        assert len(_missing_warnings(supervisor)) == 1

        # A new load of the rules is checked again: one more warning.
        rules.write_text(RULES + "\n# edited\n")
        later = time.time() + 2
        os.utime(rules, (later, later))
        assert wait_until(lambda: len(_missing_warnings(supervisor)) == 2, 60), supervisor.stdout_lines()[
            -20:
        ]
        dovecot.deliver(ALICE, message(4, subject="invoice 3"))
        assert wait_until(lambda: _count(supervisor, FAILED) == 3, 60)
        assert len(_missing_warnings(supervisor)) == 2


def test_a_check_the_server_cannot_answer_is_tried_again_a_minute_later(dovecot: LocalDovecot) -> None:
    from structlog.testing import capture_logs

    from emailops.replies.mailbox import MailboxSession
    from emailops.replies.move_folders import MoveFolderCheck
    from emailops.rules.loader import parse_rules
    from localmail.dovecot import free_loopback_port
    from tests.index_helpers import imap_config

    ruleset = parse_rules(
        {"rules": [{"name": "r", "actions": {"move": {"folder": "Later", "create": True}}}]},
        path=Path("x.toml"),
    )
    clock = [100.0]
    nobody = MailboxSession(imap_config(dovecot, port=free_loopback_port()))
    check = MoveFolderCheck(nobody, create=True, monotonic=lambda: clock[0])
    with capture_logs() as logs:
        check(ruleset)
        clock[0] += MoveFolderCheck.RETRY_SECONDS - 1
        check(ruleset)  # not yet: the server is not asked every second
    assert [entry["event"] for entry in logs] == [
        "could not check the rules' move folders on the server; trying again"
    ]
    assert "Later" not in _folders(dovecot)

    check.mailbox = MailboxSession(imap_config(dovecot))
    clock[0] += 2
    with capture_logs() as logs:
        check(ruleset)
        check(ruleset)  # checked once per load of the rules
    assert [(entry["event"], entry["folder"]) for entry in logs] == [
        ("created the folder the rules move mail to", "Later")
    ]
    assert "Later" in _folders(dovecot)
    check.mailbox.close()
