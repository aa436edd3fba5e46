"""The parsing helper process of large syncs: same results as parsing here, and no orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emailops.imap import parsing
from emailops.imap.parsing import Parser
from emailops.processes import pid_alive
from tests.corpus.hostile import hostile_corpus

REPO = Path(__file__).resolve().parents[1]
HOLD_A_HELPER = """
import sys, time
from emailops.imap.parsing import Parser
parser = Parser(max_message_bytes=2**20, max_body_chars=1000, use_helper=True)
parser.submit([(b"Subject: x\\r\\n\\r\\nhi", 20)]).result()
print(*[p.pid for p in parser._pool._processes.values()], flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_helper_and_local_parsing_agree(start_method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "helper_start_method", lambda: start_method)
    raws = [(raw, len(raw)) for _name, raw in hostile_corpus()]
    with Parser(max_message_bytes=2**20, max_body_chars=50_000, use_helper=True) as helper:
        remote = helper.submit(raws).result()
    with Parser(max_message_bytes=2**20, max_body_chars=50_000, use_helper=False) as local:
        here = local.submit(raws).result()
    # What the index stores agrees; the parse times (``parse_seconds``) differ from run to run.
    assert [(c.columns, c.attachments) for c in remote] == [(c.columns, c.attachments) for c in here]
    assert all(c.parse_seconds > 0 for c in remote + here)
    assert any(content.columns["body_text"] for content in remote)
    assert any(content.attachments for content in remote)


def test_helper_is_forked_only_from_a_process_without_other_threads() -> None:
    probe = (
        "import threading\n"
        "from emailops.imap.parsing import helper_start_method\n"
        "alone = helper_start_method()\n"
        "release = threading.Event()\n"
        "threading.Thread(target=release.wait).start()\n"
        "print(alone, helper_start_method())\n"
        "release.set()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.split() == ["fork", "spawn"], result.stderr


def test_helpers_exit_when_their_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_HELPER], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    helper_pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert helper_pids and all(pid_alive(pid) for pid in helper_pids)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in helper_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(pid) for pid in helper_pids), "a helper outlived its parent"
