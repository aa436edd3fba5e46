"""The supervisor with real worker processes running the test units of ``tests.shell_workers``."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emailops.processes import pid_alive
from prod.supervisor import RestartPolicy
from prod.worker import WorkerLoop, error_backoff_seconds, load_factory
from tests.shell_workers import (
    SupervisorProcess,
    healthy_line,
    run_healthcheck,
    shell_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def _healthy(tmp_path: Path, env: dict[str, str]) -> bool:
    output, code, _ = run_healthcheck(tmp_path, env)
    return code == 0 and output == healthy_line(env)


def _journals(tmp_path: Path) -> dict[str, list[str]]:
    return {path.name: path.read_text().splitlines() for path in (tmp_path / "units").glob("unit-*.log")}


def test_kill_9_of_a_worker_is_replaced_and_health_returns(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2")
    with SupervisorProcess(tmp_path, env) as supervisor:
        pids = wait_until(lambda: len(supervisor.worker_pids()) == 2 and supervisor.worker_pids(), 20)
        assert pids, supervisor.stdout_lines()
        assert wait_until(lambda: _healthy(tmp_path, env), 10)

        os.kill(pids[1], signal.SIGKILL)
        replaced = wait_until(
            lambda: (p := supervisor.worker_pids()).get(1) not in (None, pids[1]) and len(p) == 2, 20
        )
        assert replaced, supervisor.stdout_lines()
        assert supervisor.worker_pids()[2] == pids[2]
        assert wait_until(lambda: _healthy(tmp_path, env), 10)

        died = [r for r in supervisor.records() if r["message"] == "worker died; restarting"]
        assert died and died[0]["worker"] == 1 and died[0]["exit_code"] == -signal.SIGKILL
        assert died[0]["level"] == "ERROR"


def test_repeated_boot_failure_stops_with_non_zero_exit(tmp_path: Path) -> None:
    env = shell_env(tmp_path, EMAILOPS_WORKER_TARGET="tests.shell_workers:failing_boot")
    started = time.monotonic()
    with SupervisorProcess(tmp_path, env) as supervisor:
        code = supervisor.wait(timeout=40)
        elapsed = time.monotonic() - started
        records = supervisor.records()
    assert code == 3
    boots = (tmp_path / "units" / "boots").read_text().split()
    assert len(boots) == RestartPolicy().max_boot_failures
    assert elapsed < 30
    messages = [r["message"] for r in records]
    assert messages.count("worker failed to boot") == len(boots)
    assert messages.count("worker failed to boot; retrying") == len(boots) - 1
    fatal = next(r for r in records if r["level"] == "CRITICAL")
    assert fatal["message"] == "worker failed to boot repeatedly; giving up"
    # The boot failure names its cause, and the retries wait longer each time.
    assert any("cannot reach the IMAP server" in r.get("exception", "") for r in records)
    failed = next(r for r in records if r["message"] == "worker failed to boot")
    assert failed["error_type"] == "ConnectionRefusedError"
    assert failed["error"] == "cannot reach the IMAP server (test)"
    delays = [r["retry_in_seconds"] for r in records if r["message"] == "worker failed to boot; retrying"]
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert not (Path(env["STATE_DIR"]) / "supervisor.json").exists()


def test_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    env = shell_env(
        tmp_path,
        WORKERS="2",
        # Long enough for a worker to boot on a loaded machine (boot counts against it too).
        HEARTBEAT_TIMEOUT_SECONDS="4",
        EMAILOPS_WORKER_TARGET="tests.shell_workers:hanging_unit",
    )
    with SupervisorProcess(tmp_path, env) as supervisor:
        marker = tmp_path / "units" / "hung-once"
        assert wait_until(marker.exists, 20), supervisor.stdout_lines()
        hung_pid = int(marker.read_text())
        assert wait_until(lambda: not pid_alive(hung_pid), 15), "the hung worker was not killed"
        assert wait_until(lambda: supervisor.worker_pids().get(1) not in (None, hung_pid), 15)
        assert wait_until(lambda: _healthy(tmp_path, env), 10)
        # On a loaded machine another worker may be killed for booting too slowly first.
        hung = [r for r in supervisor.records() if r["message"] == "worker is hung; killing it"]
        assert [(r["worker"], r["reason"]) for r in hung if r["worker_pid"] == hung_pid] == [
            (1, "no heartbeat")
        ]


@pytest.mark.timeout(120)
def test_a_worker_waiting_on_a_server_within_bound_lives_one_stuck_past_it_is_killed(
    tmp_path: Path,
) -> None:
    env = shell_env(
        tmp_path,
        WORKERS="2",
        HEARTBEAT_TIMEOUT_SECONDS="6",
        SHELL_WORKER_WAIT_SECONDS="18",
        EMAILOPS_WORKER_TARGET="tests.shell_workers:network_waiting_unit",
    )
    with SupervisorProcess(tmp_path, env) as supervisor:
        waited, stuck = (tmp_path / "units" / "waiting-1"), (tmp_path / "units" / "waiting-2")
        assert wait_until(lambda: waited.exists() and stuck.exists(), 20), supervisor.stdout_lines()
        waited_pid, stuck_pid = int(waited.read_text()), int(stuck.read_text())
        # Stuck past the wait's bound: no beat for it, killed as hung like any stuck worker.
        assert wait_until(lambda: not pid_alive(stuck_pid), 30), "the stuck worker was not killed"
        # Waiting within the bound for 3 x the heartbeat timeout: alive, and it goes on after.
        journal = tmp_path / "units" / f"unit-1-{waited_pid}.log"
        assert wait_until(lambda: journal.read_text().count("end") >= 2, 40), journal.read_text()
        assert pid_alive(waited_pid) and supervisor.worker_pids()[1] == waited_pid
        hung = {
            r["worker_pid"]: r["reason"]
            for r in supervisor.records()
            if r["message"] == "worker is hung; killing it"
        }
        assert hung.get(stuck_pid) == "no heartbeat" and waited_pid not in hung


def test_sigterm_finishes_the_current_unit_and_exits_0(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2", SHELL_WORKER_UNIT_SECONDS="1.0", SHUTDOWN_TIMEOUT_SECONDS="5")
    with SupervisorProcess(tmp_path, env) as supervisor:
        assert wait_until(lambda: len(supervisor.worker_pids()) == 2, 20)
        # Signal in the middle of a unit: a "begin" without its "end" yet.
        assert wait_until(
            lambda: any(lines and lines[-1].startswith("begin") for lines in _journals(tmp_path).values()), 10
        )
        workers = list(supervisor.worker_pids().values())
        sent = time.monotonic()
        supervisor.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = supervisor.wait(timeout=15)
        elapsed = time.monotonic() - sent
    assert code == 0
    assert elapsed < float(env["SHUTDOWN_TIMEOUT_SECONDS"]) + 2
    assert not any(pid_alive(pid) for pid in workers)
    journals = _journals(tmp_path)
    assert len(journals) == 2
    for lines in journals.values():
        assert lines[-1] == "closed"
        units = lines[:-1]
        assert len(units) % 2 == 0 and units, units
        for begin, end in zip(units[::2], units[1::2], strict=True):
            assert begin.replace("begin", "end") == end
    assert not (Path(env["STATE_DIR"]) / "supervisor.json").exists()


def test_sigint_stops_quickly(tmp_path: Path) -> None:
    env = shell_env(tmp_path, SHELL_WORKER_UNIT_SECONDS="0.2", SHUTDOWN_TIMEOUT_SECONDS="30")
    with SupervisorProcess(tmp_path, env) as supervisor:
        assert wait_until(lambda: supervisor.worker_pids(), 20)
        sent = time.monotonic()
        supervisor.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert supervisor.wait(timeout=10) == 0
        assert time.monotonic() - sent < 3


def test_sigint_gives_a_worker_that_finished_its_unit_the_time_to_exit(tmp_path: Path) -> None:
    # Ctrl-C stops quickly: a unit still running after QUICK_STOP_SECONDS is cut short. But a worker
    # that has finished its unit is exiting (closing connections, releasing leases) and is not killed.
    env = shell_env(
        tmp_path,
        WORKERS="2",
        SHELL_WORKER_UNIT_SECONDS="0.8",
        SHELL_WORKER_CLOSE_SECONDS="1.5",
        SHUTDOWN_TIMEOUT_SECONDS="10",
    )
    with SupervisorProcess(tmp_path, env) as supervisor:
        _stop_mid_unit(supervisor, tmp_path, 2)
        supervisor.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert supervisor.wait(timeout=15) == 0
        records = supervisor.records()
    assert [r["message"] for r in records].count("worker stopped") == 2
    assert "worker did not stop in time; killing" not in [r["message"] for r in records]
    exits = [r["exit_code"] for r in records if r["message"] == "worker exited"]
    assert exits == [0, 0]
    for lines in _journals(tmp_path).values():
        assert lines[-1] == "closed", lines


def _stop_mid_unit(supervisor: SupervisorProcess, tmp_path: Path, workers: int) -> None:
    assert wait_until(lambda: len(supervisor.worker_pids()) == workers, 20)
    assert wait_until(
        lambda: any(lines and lines[-1].startswith("begin") for lines in _journals(tmp_path).values()), 10
    )


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_that_arrives_twice_at_once_is_one_graceful_stop(
    tmp_path: Path, first: signal.Signals
) -> None:
    # `timeout`, `kill -- -PGID` or a terminal's Ctrl-C reach the whole process group while a parent
    # (the demo, a wrapper script) forwards the same request as a SIGTERM a few milliseconds later.
    env = shell_env(tmp_path, SHELL_WORKER_UNIT_SECONDS="0.5", SHUTDOWN_TIMEOUT_SECONDS="5")
    with SupervisorProcess(tmp_path, env) as supervisor:
        _stop_mid_unit(supervisor, tmp_path, 1)
        supervisor.process.send_signal(first)  # type: ignore[union-attr]
        time.sleep(0.05)
        supervisor.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert supervisor.wait(timeout=15) == 0
        messages = [r["message"] for r in supervisor.records()]
    assert "second stop signal: killing workers now" not in messages
    assert "worker did not stop in time; killing" not in messages
    (lines,) = _journals(tmp_path).values()
    assert lines[-1] == "closed", lines  # the unit in progress finished; the worker was not killed
    assert lines[-2].startswith("end"), lines


def test_a_second_stop_signal_later_kills_the_workers_at_once(tmp_path: Path) -> None:
    env = shell_env(tmp_path, SHELL_WORKER_UNIT_SECONDS="30", SHUTDOWN_TIMEOUT_SECONDS="30")
    with SupervisorProcess(tmp_path, env) as supervisor:
        _stop_mid_unit(supervisor, tmp_path, 1)
        supervisor.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(2.0)  # the operator asks again: do not wait out the 30 s grace
        sent = time.monotonic()
        supervisor.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert supervisor.wait(timeout=15) == 0
        assert time.monotonic() - sent < 5
        messages = [r["message"] for r in supervisor.records()]
    assert "second stop signal: killing workers now" in messages


def test_kill_9_of_the_supervisor_leaves_no_worker_behind(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2", SHUTDOWN_TIMEOUT_SECONDS="2")
    with SupervisorProcess(tmp_path, env) as supervisor:
        pids = wait_until(lambda: len(supervisor.worker_pids()) == 2 and supervisor.worker_pids(), 20)
        assert pids
        # Nothing is left in /dev/shm either: no process of the daemon holds a named semaphore
        # (a file there that only a clean exit removes); its shared memory is unlinked at once.
        for pid in (supervisor.pid, *pids.values()):
            mapped = Path(f"/proc/{pid}/maps").read_text().splitlines()
            assert [line for line in mapped if "/dev/shm/" in line and "(deleted)" not in line] == []
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=5)
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids.values()), 10)
        output, code, _ = run_healthcheck(tmp_path, env)
        assert code == 1 and json.loads(output)["error_type"] == "SupervisorNotRunning"


def test_config_error_exits_78_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    env = shell_env(tmp_path, EMAIL_USERNAME="bob")
    del env["EMAIL_PASSWORD"]
    result = subprocess.run(
        [sys.executable, "-m", "prod.run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 78
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    record = json.loads(lines[0])
    assert record["level"] == "ERROR"
    assert "EMAIL_PASSWORD" in record["message"]
    assert record["error_type"] == "ConfigError"
    assert result.stderr == ""
    assert not (tmp_path / "state").exists()


# -- the loops' logic with fakes (no processes)


class _Unit:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def run_once(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(f"server down {self.calls}")

    def close(self) -> None:
        pass


class _Log:
    def __init__(self) -> None:
        self.errors: list[dict[str, object]] = []

    def exception(self, message: str, **context: object) -> None:
        self.errors.append({"message": message, **context})


def test_worker_loop_backs_off_on_errors_and_keeps_beating() -> None:
    now = [0.0]
    beats: list[float] = []
    log = _Log()
    unit = _Unit(failures=3)
    loop = WorkerLoop(
        unit,
        beat=lambda: beats.append(now[0]),
        stop_requested=lambda: False,
        sleep=lambda seconds: now.__setitem__(0, now[0] + seconds),
        clock=lambda: now[0],
        log=log,
    )
    for _ in range(4):
        loop.run_iteration()
    assert unit.calls == 4
    assert [e["retry_in_seconds"] for e in log.errors] == [1.0, 2.0, 4.0]
    assert now[0] == pytest.approx(7.0)
    assert loop.consecutive_failures == 0
    # Beats at least every slice while backing off, so the supervisor does not take it for hung.
    assert max(b - a for a, b in itertools.pairwise(beats)) <= 0.25 + 1e-9


def test_worker_loop_stops_between_units() -> None:
    unit = _Unit(failures=0)
    loop = WorkerLoop(unit, beat=lambda: None, stop_requested=lambda: unit.calls >= 3, log=_Log())
    loop.run()
    assert unit.calls == 3


def test_backoff_figures_and_target_parsing() -> None:
    policy = RestartPolicy(base_delay_seconds=0.5, max_delay_seconds=4)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [error_backoff_seconds(n) for n in (0, 1, 2, 10)] == [0.0, 1.0, 2.0, 30.0]
    assert load_factory("tests.shell_workers:journaling_unit").__name__ == "journaling_unit"
    with pytest.raises(ValueError, match="module:callable"):
        load_factory("tests.shell_workers")


def test_the_previous_run_is_known_over_only_when_its_supervisor_is_gone(tmp_path: Path) -> None:
    # Its leases and claims are taken at once by the next start (a container restarted, or killed
    # with -9); while its supervisor may still be alive, they wait for their expiry.
    from prod import heartbeat as state_file

    now = time.time()
    assert state_file.previous_runs_over(tmp_path, "run-a", now) == ()  # the first start here
    assert state_file.previous_runs_over(tmp_path, "run-b", now) == ("run-a",)  # stopped cleanly
    alive = state_file.SupervisorState(pid=os.getppid(), heartbeat=now, expected_workers=1, started_at=now)
    state_file.write_state(tmp_path, alive)
    assert state_file.previous_runs_over(tmp_path, "run-c", now + 1) == ()
    # Killed: its state file is left behind and no longer rewritten.
    later = now + 2 + state_file.SUPERVISOR_STALE_SECONDS
    # Killed, and so was the start before it before it took over (the run of run-a is long gone).
    assert state_file.previous_runs_over(tmp_path, "run-d", later) == ("run-c", "run-b", "run-a")
    # Killed a moment ago (the file is still fresh) and restarted at once: its pid is gone.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = state_file.SupervisorState(pid=int(gone.stdout), heartbeat=now, expected_workers=1, started_at=now)
    state_file.write_state(tmp_path, dead)
    assert state_file.previous_runs_over(tmp_path, "run-e", now + 1)[0] == "run-d"
