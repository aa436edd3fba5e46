"""A frozen IMAP server (Dovecot or Cyrus, stopped with SIGSTOP) against the real daemon (python -m prod.run):
the workers wait for it, are not killed as hung, the healthcheck names it, and mail is indexed
once it answers again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from emailops.store.account_state import State, account_states
from localmail.imap_server import LocalImapServer
from prod.worker_status import status_path
from tests.index_helpers import ALICE, daemon_env, index_engine, message, rows
from tests.shell_workers import REPO_ROOT, SupervisorProcess, run_healthcheck, wait_until

pytestmark = pytest.mark.timeout(240)

HEARTBEAT_TIMEOUT = 6.0
EMAIL_TIMEOUT = 3.0
FOLDERS = ("INBOX", "Alpha", "Beta", "Gamma")


def _health(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    output, _code, _cpu = run_healthcheck(tmp_path, env)
    answer: dict[str, object] = json.loads(output)
    return answer


def _subjects(env: dict[str, str]) -> set[str]:
    engine = index_engine(env["INDEX_DB_URL"])
    try:
        return {str(subject) for (subject,) in rows(engine, "SELECT subject FROM messages")}
    finally:
        engine.dispose()


def test_a_frozen_server_gets_no_worker_killed_and_is_named_by_the_healthcheck(
    imap_server: LocalImapServer, tmp_path: Path
) -> None:
    for folder in FOLDERS[1:]:
        imap_server.create_folder(ALICE, folder)
    imap_server.deliver(ALICE, message(1, subject="before the freeze"))
    env = daemon_env(
        imap_server,
        tmp_path,
        PYTHONPATH=str(REPO_ROOT),
        WORKERS="1",
        EMAIL_FOLDERS=",".join(FOLDERS),
        # Every folder polled over one shared connection: each waits its timeout in turn.
        IMAP_IDLE="false",
        POLL_INTERVAL_SECONDS="1",
        EMAIL_TIMEOUT_SECONDS=str(EMAIL_TIMEOUT),
        HEARTBEAT_TIMEOUT_SECONDS=str(HEARTBEAT_TIMEOUT),
    )
    state_dir = Path(env["STATE_DIR"])
    with SupervisorProcess(tmp_path, env) as supervisor:
        assert wait_until(lambda: "before the freeze" in _subjects(env), 60), supervisor.stdout_lines()
        assert wait_until(lambda: _health(tmp_path, env)["ok"], 30), _health(tmp_path, env)
        pids = supervisor.worker_pids()
        assert set(pids) == {1}

        endpoint = f"{imap_server.host}:{imap_server.imap_port}"
        named: dict[str, object] = {}
        waits_seen: set[str] = set()
        error_types: set[str] = set()
        imap_server.freeze()
        frozen_at = time.monotonic()
        try:
            while time.monotonic() - frozen_at < 3 * HEARTBEAT_TIMEOUT:
                waiting = json.loads(status_path(state_dir, 1).read_text()).get("waiting")
                if waiting is not None:
                    waits_seen.add(waiting["endpoint"])
                answer = _health(tmp_path, env)
                error_types.add(str(answer.get("error_type")))
                if answer.get("error_type") == "ImapServerNotAnswering":
                    named = answer
                time.sleep(0.5)
        finally:
            imap_server.thaw()

        hung = [
            record for record in supervisor.records() if record["message"] == "worker is hung; killing it"
        ]
        assert hung == []
        assert supervisor.worker_pids() == pids
        # While frozen: the status said what the worker waited for, the healthcheck named the server.
        assert waits_seen == {endpoint}
        assert named and endpoint in str(named["error"]), named
        assert "WorkersMissing" not in error_types
        # Calls timed out one after another, longer together than the heartbeat timeout: one per
        # attempt of the account (its other folders wait for its next attempt, in backoff).
        timeouts = [
            record
            for record in supervisor.records()
            if record["message"] == "IMAP connection failed" and "timed out" in record["error"]
        ]
        assert len(timeouts) * EMAIL_TIMEOUT > HEARTBEAT_TIMEOUT, timeouts
        engine = index_engine(env["INDEX_DB_URL"])
        try:
            states = account_states(engine)
        finally:
            engine.dispose()
        # Backoff, or ok again if the server answered its next attempt: never a refused sign-in.
        [account] = states.values()
        assert account.state in (State.BACKOFF, State.OK) and account.last_error_kind == "connection", account
        assert account.last_error is not None and "timed out" in account.last_error, account

        # Mail that arrives once the server answers is indexed: the worker went on.
        imap_server.deliver(ALICE, message(2, subject="after the thaw"))
        imap_server.append(ALICE, "Gamma", message(3, subject="after the thaw in Gamma"))
        assert wait_until(lambda: {"after the thaw", "after the thaw in Gamma"} <= _subjects(env), 90), (
            supervisor.stdout_lines()[-30:]
        )
        assert wait_until(lambda: _health(tmp_path, env)["ok"], 60), _health(tmp_path, env)
        assert supervisor.worker_pids() == pids
        assert not any(record["message"] == "worker is hung; killing it" for record in supervisor.records())
