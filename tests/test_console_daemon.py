"""The operator console served by the daemon (``WEB_PORT``): one more supervised process, restarted
like a worker, counted in ``/metrics``; a port in use leaves the mail work running without it."""

from __future__ import annotations

import os
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from localmail.dovecot import free_loopback_port
from tests.shell_workers import SupervisorProcess, shell_env, wait_until

pytestmark = pytest.mark.timeout(150)
# A console process (imports, migrations) may take longer than the 5 s of the shell workers to
# boot on a loaded machine; hang detection is not what these tests are about.
HEARTBEAT_TIMEOUT = "30"


def _get(url: str) -> tuple[int, dict[str, str], str] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 (loopback http)
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()
    except OSError:
        return None


def _console_pid(supervisor: SupervisorProcess) -> int | None:
    """The pid of the console process last started, once it runs (has beaten)."""
    records = [r for r in supervisor.records() if r.get("worker") == "console"]
    spawned = [r["worker_pid"] for r in records if r["message"] == "worker spawned"]
    running = records and records[-1]["message"] == "worker running"
    return spawned[-1] if spawned and running else None


def _requests_total(metrics_port: int) -> dict[tuple[str, str, str], float]:
    text = _get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert text is not None
    counts = {}
    for family in text_string_to_metric_families(text[2]):
        for sample in family.samples:
            if sample.name == "emailops_http_requests_total":
                labels = sample.labels
                counts[(labels["route"], labels["method"], labels["status"])] = sample.value
    return counts


def test_the_console_is_served_restarted_after_a_kill_and_counted_in_metrics(tmp_path: Path) -> None:
    web_port, metrics_port = free_loopback_port(), free_loopback_port()
    env = shell_env(
        tmp_path,
        WEB_PORT=str(web_port),
        METRICS_PORT=str(metrics_port),
        HEARTBEAT_TIMEOUT_SECONDS=HEARTBEAT_TIMEOUT,
    )
    with SupervisorProcess(tmp_path, env) as supervisor:
        health = f"http://127.0.0.1:{web_port}/healthz"
        first = wait_until(lambda: _get(health), 60)
        assert first is not None, supervisor.stdout_lines()
        status, headers, body = first
        assert (status, body) == (200, '{"status":"ok"}')
        assert len(headers["x-request-id"]) == 16
        assert wait_until(lambda: supervisor.worker_pids().get(1), 20), supervisor.stdout_lines()

        pid = wait_until(lambda: _console_pid(supervisor), 10)
        assert pid is not None, supervisor.stdout_lines()
        os.kill(pid, signal.SIGKILL)
        replaced = wait_until(lambda: (p := _console_pid(supervisor)) not in (None, pid) and p, 60)
        assert replaced, supervisor.stdout_lines()
        assert wait_until(lambda: (answer := _get(health)) is not None and answer[0] == 200, 60)
        died = [r for r in supervisor.records() if r["message"] == "worker died; restarting"]
        assert [r["worker"] for r in died] == ["console"]

        signed_out = _get(f"http://127.0.0.1:{web_port}/api/v1/users")
        assert signed_out is not None and signed_out[0] == 401
        counts = wait_until(lambda: _requests_total(metrics_port).get(("/api/v1/users", "GET", "401")), 10)
        assert counts == 1
        assert _requests_total(metrics_port)[("/healthz", "GET", "200")] >= 2

        lines = [
            r for r in supervisor.records() if r.get("component") == "console" and r["message"] == "request"
        ]
        assert any(
            r["route"] == "/api/v1/users" and r["status"] == 401 and len(r["request_id"]) == 16 for r in lines
        )


def test_a_console_port_in_use_is_one_error_line_and_the_mail_work_goes_on(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = shell_env(tmp_path, WEB_PORT=str(port))
        with SupervisorProcess(tmp_path, env) as supervisor:
            # The positive sign first: the worker ran units.
            assert wait_until(lambda: supervisor.worker_pids().get(1), 30), supervisor.stdout_lines()
            assert wait_until(lambda: list((tmp_path / "units").glob("unit-*.log")), 10)
            errors = [r for r in supervisor.records() if r["level"] == "ERROR"]
            assert len(errors) == 1, errors
            assert f"cannot listen on 127.0.0.1:{port}" in errors[0]["message"]
            assert "WEB_PORT" in errors[0]["message"]
            assert errors[0]["port"] == port
            assert not any(r.get("worker") == "console" for r in supervisor.records())
            assert supervisor.process is not None and supervisor.process.poll() is None
