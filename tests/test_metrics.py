"""``emailops.metrics`` off and on, the bounded labels, the supervisor's count of log lines, and
the endpoint's life: off without METRICS_PORT, emptied at start, a dead worker's gauges dropped.

The whole path (workers' files summed by the supervisor's endpoint, scraped by Prometheus) is
tested in test_monitoring_e2e.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emailops import metrics
from localmail.dovecot import free_loopback_port
from prod.logging_setup import LogCollector, _LineHandler
from tests.shell_workers import REPO_ROOT, SupervisorProcess, shell_env, wait_until

# Every reason text the replies code gives (robots.py, limits.py, engine.py), one of each shape.
REASONS = {
    "auto-submitted: auto-generated": "auto_submitted",
    "precedence: bulk": "precedence",
    "mailing list (list-id)": "mailing_list",
    "mailing list (list-unsubscribe)": "mailing_list",
    "x-auto-response-suppress: all": "auto_response_suppress",
    "null return path (<>)": "null_return_path",
    "our own automatic reply": "own_reply",
    "no valid address to reply to (no address)": "no_valid_address",
    "no valid address (bad)": "no_valid_address",
    "own address": "own_address",
    "role address mailer-daemon": "role_address",
    "list request address (*-request)": "list_address",
    "list owner address (owner-*)": "list_address",
    "no-reply address": "noreply_address",
    "never-reply list (*@example.org)": "never_reply_to",
    "already answered this sender within 7 days": "once_per_sender",
    "sender cap: 3 replies to this sender in 24 hours": "sender_cap",
    "hourly cap: 100 replies in the last hour": "hourly_cap",
}


@pytest.mark.parametrize(("reason", "kind"), REASONS.items())
def test_each_suppression_reason_has_its_bounded_label(reason: str, kind: str) -> None:
    assert metrics.suppression_kind(reason) == kind


def test_an_unknown_reason_is_other_never_its_text() -> None:
    assert metrics.suppression_kind("sender bob@example.org is strange") == "other"


def test_off_until_enabled_without_importing_prometheus_client() -> None:
    code = (
        "import sys\n"
        "from emailops import metrics\n"
        "metrics.messages_indexed('INBOX', 3); metrics.parse_problems({'charset-unknown': 1})\n"
        "metrics.index_lag(1.0); metrics.folder_synced('INBOX', 1.0); metrics.imap_error('auth')\n"
        "metrics.reply_suppressed('ack', 'precedence: bulk'); metrics.outbox_depth({}, ['sent'])\n"
        "print(metrics.enabled(), 'prometheus_client' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def test_enabled_values_go_to_the_multiprocess_files(tmp_path: Path) -> None:
    """A worker's values, written under PROMETHEUS_MULTIPROC_DIR, are read back by the collector."""
    code = (
        "from emailops import metrics\n"
        "metrics.enable(); metrics.enable()\n"
        "metrics.messages_indexed('INBOX', 3)\n"
        "metrics.parse_problems({metrics.problem_kind('charset-unknown:x'): 1, 'base64-broken': 1})\n"
        "metrics.imap_error('auth'); metrics.reply_suppressed('ack', 'precedence: bulk')\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):  # two processes: summed
        subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True)
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    text = generate_latest(registry).decode()
    assert 'emailops_messages_indexed_total{folder="INBOX"} 6.0' in text
    assert 'emailops_parse_problems_total{kind="charset-unknown"} 2.0' in text
    assert 'emailops_auth_failures_total{protocol="imap"} 2.0' in text
    assert 'emailops_imap_errors_total{kind="auth"} 2.0' in text
    assert 'emailops_replies_suppressed_total{reason="precedence",rule="ack"} 2.0' in text
    assert 'emailops_replies_total{outcome="suppressed",rule="ack"} 2.0' in text


def test_per_account_values_are_labelled_by_the_account_never_by_an_address(tmp_path: Path) -> None:
    """An account named by an address is labelled by its short id; state is one gauge per state."""
    code = (
        "from emailops import metrics\n"
        "metrics.enable()\n"
        "metrics.messages_indexed('INBOX', 3, 'alice@example.com@imap.example.com')\n"
        "metrics.imap_error('connection', 'support')\n"
        "metrics.account_state('support', 'backoff', ['ok', 'backoff', 'auth_failed', 'disabled'])\n"
        "metrics.account_synced('support', 1700000000.0)\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True)
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    text = generate_latest(registry).decode()
    label = metrics.account_label("alice@example.com@imap.example.com")
    assert f'emailops_account_messages_indexed_total{{account="{label}"}} 3.0' in text
    assert "alice" not in text and "@" not in text
    assert 'emailops_account_errors_total{account="support",kind="connection"} 1.0' in text
    assert 'emailops_account_state{account="support",state="backoff"} 1.0' in text
    for state in ("ok", "auth_failed", "disabled"):
        assert f'emailops_account_state{{account="support",state="{state}"}} 0.0' in text
    assert 'emailops_account_last_sync_timestamp_seconds{account="support"} 1.7e+09' in text


class _ListSink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def close(self) -> None:
        pass


def test_the_collector_counts_the_lines_it_writes_by_level() -> None:
    sink = _ListSink()
    collector = LogCollector([sink])  # type: ignore[list-item]
    handler = _LineHandler(collector.write)
    logger = logging.getLogger("tests.metrics.lines")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        for level in (logging.INFO, logging.INFO, logging.WARNING, logging.ERROR, logging.DEBUG):
            logger.log(level, 'a line with "level":"ERROR" in its text')
        collector.write("not json at all")
    finally:
        logger.removeHandler(handler)
        collector.close()
    assert collector.line_counts() == {"INFO": 2, "WARNING": 1, "ERROR": 1, "DEBUG": 1}
    assert [json.loads(line)["level"] for line in sink.lines[:5]] == [
        "INFO",
        "INFO",
        "WARNING",
        "ERROR",
        "DEBUG",
    ]


def test_a_metrics_port_in_use_stops_the_start_naming_it(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = shell_env(tmp_path, METRICS_PORT=str(port))
        result = subprocess.run(
            [sys.executable, "-m", "prod.run"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 78, result
    (line,) = result.stdout.splitlines()
    assert (
        f"invalid configuration: METRICS_PORT: cannot listen on 127.0.0.1:{port}"
        in json.loads(line)["message"]
    )


# A scrape: (sample name, its labels sorted) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    """The daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _scrape_when_up(port: int) -> Samples | None:
    """A scrape once the supervisor reports its one worker up, else None."""
    try:
        samples = _scrape(port)
    except OSError:
        return None
    return samples if samples.get(("emailops_workers_up", ())) == 1 else None


def test_without_metrics_port_there_is_no_endpoint_and_no_file(tmp_path: Path) -> None:
    env = shell_env(tmp_path)
    with SupervisorProcess(tmp_path, env) as supervisor:
        units = tmp_path / "units"
        assert wait_until(lambda: any("end 1" in f.read_text() for f in units.glob("unit-1-*.log")), 30)
        messages = [record["message"] for record in supervisor.records()]
    assert "metrics endpoint listening" not in messages, messages
    assert not (tmp_path / "state" / "metrics").exists()


def test_a_start_empties_the_files_of_the_last_run(tmp_path: Path) -> None:
    """Values a former run left in STATE_DIR/metrics are not served: the directory is emptied."""
    stale = tmp_path / "state" / "metrics"
    stale.mkdir(parents=True)
    code = "from emailops import metrics\nmetrics.enable()\nmetrics.messages_indexed('Stale', 5)\n"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(stale), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True)
    assert list(stale.glob("counter_*.db"))  # the former run's file, about to be removed
    port = free_loopback_port()
    with SupervisorProcess(tmp_path, shell_env(tmp_path, METRICS_PORT=str(port))):
        samples = wait_until(lambda: _scrape_when_up(port), 30)
    assert samples is not None, "the endpoint never reported its worker up"
    assert ("emailops_messages_indexed_total", (("folder", "Stale"),)) not in samples
    assert not [name for name, _ in samples if name.startswith("emailops_messages_indexed")]


def test_a_dead_workers_live_gauges_are_dropped(tmp_path: Path) -> None:
    """The outbox gauge of a worker killed with -9 leaves the scrape (counters staying is checked
    with a real daemon in test_monitoring_e2e.py)."""
    port = free_loopback_port()
    env = shell_env(
        tmp_path, METRICS_PORT=str(port), EMAILOPS_WORKER_TARGET="tests.shell_workers:outbox_gauge_unit"
    )
    outbox = ("emailops_outbox_replies", (("state", "sent"),))
    died = ("emailops_worker_restarts_total", (("reason", "died"),))

    def with_gauge() -> Samples | None:
        samples = _scrape_when_up(port)
        return samples if samples and outbox in samples else None

    def after_the_restart() -> Samples | None:
        samples = _scrape_when_up(port)  # up again: the replacement runs
        return samples if samples and samples.get(died) == 1 else None

    with SupervisorProcess(tmp_path, env):
        before = wait_until(with_gauge, 30)
        assert before is not None and before[outbox] == 7, before
        os.kill(int((tmp_path / "units" / "outbox-gauge-set").read_text()), signal.SIGKILL)
        after = wait_until(after_the_restart, 30)
    assert after is not None, "the supervisor never counted the worker's death"
    assert outbox not in after  # the replacement set no value; the dead process's one is gone
