"""Monitoring as operators use it: a real Prometheus scraping the daemon (WORKERS=2) while it syncs,
indexes new mail and replies; one message's story told by its request_id; the healthcheck failing
while the mail server is unreachable (or refuses the sign-in, or lacks the folder) and recovering.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emailops import metrics
from localmail.dovecot import LocalDovecot, free_loopback_port
from localmail.smtp_relay import LocalSmtpRelay
from prod.worker_status import read_status
from tests.index_helpers import ALICE, daemon_env, first_synced, message
from tests.prometheus_server import PROMTOOL, LocalPrometheus, scraped
from tests.test_daemon_e2e import REPO, healthcheck, supervisor_state, wait_for
from tests.test_replies_e2e import inbound

ALERTS = REPO / "examples" / "prometheus" / "alerts.yml"
RULES = (
    '[[rules]]\nname = "ack"\n[rules.match]\nsubject = "help"\n[rules.reply]\ntemplate = "Got {subject}"\n'
)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "rules.toml").write_text(RULES)
    return tmp_path


def start_daemon(env: dict[str, str], data: Path) -> subprocess.Popen[bytes]:
    with (data / "stdout.log").open("w") as stdout, (data / "stderr.log").open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, stdout=stdout, stderr=stderr
        )


@pytest.fixture
def stop_daemon() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def log_records(data: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data / "logs" / "app.log").read_text().splitlines()]


def health(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "prod.healthcheck", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    answer: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if answer["ok"] else 1), result
    return answer


def test_prometheus_counts_what_the_daemon_did_across_a_worker_restart(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, data: Path, stop_daemon: list[Any]
) -> None:
    # Mail there before the first sync: indexed, never answered.
    dovecot.create_folder(ALICE, "Archive")
    for n in range(1, 5):
        dovecot.deliver(ALICE, message(n, subject=f"help, old {n}"))
    for n in range(5, 8):
        dovecot.append(ALICE, "Archive", message(n))
    dovecot.append(ALICE, "Archive", b"From: someone@example.org\r\nSubject: no date, no id\r\n\r\nhi\r\n")
    port = free_loopback_port()
    env = daemon_env(
        dovecot,
        data,
        WORKERS="2",
        EMAIL_FOLDERS="INBOX,Archive",
        EMAIL_SMTP_PORT=str(smtp_relay.port),
        LOG_FILE_ENABLED="true",
        METRICS_PORT=str(port),
        HEARTBEAT_TIMEOUT_SECONDS="20",
    )
    stop_daemon.append(start_daemon(env, data))
    with LocalPrometheus(data, f"127.0.0.1:{port}", [ALERTS]) as prometheus:

        def counted(expression: str, expected: float, timeout: float = 30) -> None:
            last: list[float | None] = []

            def reached() -> bool:
                last[:] = [prometheus.value(expression)]
                return last[0] == expected

            try:
                wait_for(reached, timeout, expression)
            except AssertionError:
                raise AssertionError(f"{expression} is {last[0]}, expected {expected}") from None

        counted('sum(emailops_messages_indexed_total{folder="INBOX"})', 4)
        counted('sum(emailops_messages_indexed_total{folder="Archive"})', 4)
        counted('sum(emailops_parse_problems_total{kind="header-missing"})', 2)  # Date, Message-ID
        counted("emailops_workers_up", 2)
        # At least one batch in each folder, each timed from its download to its commit.
        assert (prometheus.value("sum(emailops_index_batch_duration_seconds_count)") or 0) >= 2

        # New mail: two answered; Bob's second and a list's message are not.
        dovecot.deliver(ALICE, inbound("help 1", n=1))
        dovecot.deliver(ALICE, inbound("help 2", n=2))
        dovecot.deliver(
            ALICE, inbound("help", sender="List <news@example.org>", n=3, extra="Precedence: bulk\r\n")
        )
        dovecot.deliver(ALICE, inbound("help 4", sender="Dave <dave@example.org>", n=4))
        wait_for(lambda: len(smtp_relay.accepted) == 2, 30, "two replies")
        counted('sum(emailops_replies_total{outcome="sent"})', 2)
        counted('sum(emailops_replies_suppressed_total{reason="precedence"})', 1)
        counted('sum(emailops_replies_suppressed_total{reason="once_per_sender"})', 1)
        counted('sum(emailops_messages_indexed_total{folder="INBOX"})', 8)

        # kill -9 of the worker that watches INBOX: what it counted stays in the sums. The first
        # worker up may hold both folders until the other's share is given to it (a lease round).
        def inbox_watcher() -> Any:
            state = supervisor_state(data)
            assert state is not None
            statuses = [read_status(data / "state", w.worker, w.pid) for w in state.workers]
            alone = [s for s in statuses if s is not None and [f.folder for f in s.folders] == ["INBOX"]]
            return alone[0] if len(alone) == 1 else None

        wait_for(lambda: inbox_watcher() is not None, 30, "a worker watching INBOX alone")
        victim = inbox_watcher()
        os.kill(victim.pid, signal.SIGKILL)
        counted('emailops_worker_restarts_total{reason="died"}', 1)
        wait_for(lambda: health(env)["ok"], 60, "healthy after the restart")
        counted("emailops_workers_up", 2)

        dovecot.deliver(ALICE, inbound("help 5", sender="Erin <erin@example.org>", n=5))
        wait_for(lambda: len(smtp_relay.accepted) == 3, 30, "third reply")
        counted('sum(emailops_messages_indexed_total{folder="INBOX"})', 9)
        counted('sum(emailops_messages_indexed_total{folder="Archive"})', 4)
        counted('sum(emailops_replies_total{outcome="sent"})', 3)
        counted('sum(emailops_replies_total{outcome="queued"})', 3)
        counted("sum(emailops_index_lag_seconds_count)", 5)
        counted("sum(emailops_reply_latency_seconds_count)", 3)
        counted('emailops_outbox_replies{state="sent"}', 3)
        counted('count(emailops_folder_last_sync_timestamp_seconds{folder=~"INBOX|Archive"})', 2)
        counted('count(emailops_build_info{version!=""})', 1)
        counted('count(emailops_resident_memory_bytes{process=~"supervisor|worker-1|worker-2"})', 3)
        assert (prometheus.value('emailops_log_lines_total{level="INFO"}') or 0) > 0
        assert (prometheus.value('emailops_log_lines_total{level="ERROR"}') or 0) >= 1  # "worker died"
        assert prometheus.value("sum(emailops_replies_total{outcome=~'failed|unknown'})") is None

        def firing() -> set[str]:
            return {
                a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"
            }

        assert "EmailOpsReplyNotSent" not in firing()
        # A reply the SMTP server refuses: counted, and the real Prometheus fires the runbook's alert.
        smtp_relay.fail_next(550, "5.7.1 mailbox unavailable")
        dovecot.deliver(ALICE, inbound("help 6", sender="Frank <frank@example.org>", n=6))
        counted('sum(emailops_replies_total{outcome="failed"})', 1)
        counted('sum(emailops_smtp_errors_total{kind="permanent"})', 1)
        wait_for(lambda: "EmailOpsReplyNotSent" in firing(), 30, "EmailOpsReplyNotSent firing")
        assert len(smtp_relay.accepted) == 3

    # One INFO line per new message, none for the mail that was there before; its request_id
    # follows it through the rules' decision and the delivery of its reply.
    records = log_records(data)
    indexed = [r for r in records if r["message"] == "message indexed"]
    assert len(indexed) == 6 and all(r["level"] == "INFO" and r["folder"] == "INBOX" for r in indexed)
    assert all({"uid", "size", "parse_ms", "problems"} <= set(r) for r in indexed)
    story = [r for r in records if r.get("request_id") == indexed[0]["request_id"]]
    assert [(r["component"], r["message"]) for r in story] == [
        ("index", "message indexed"),
        ("rules", "reply recorded"),
        ("smtp", "reply sent"),
    ]
    assert len({r["request_id"] for r in indexed}) == 6
    # The operator's grep of the log file finds exactly those lines.
    needle = f'"request_id":"{indexed[0]["request_id"]}"'
    grepped = [line for line in (data / "logs" / "app.log").read_text().splitlines() if needle in line]
    assert [json.loads(line) for line in grepped] == story


def test_the_healthcheck_fails_while_the_server_is_unreachable_and_recovers(
    dovecot: LocalDovecot, data: Path, stop_daemon: list[Any]
) -> None:
    env = daemon_env(
        dovecot,
        data,
        WORKERS="2",
        HEALTH_MAX_SYNC_AGE_SECONDS="4",
        POLL_INTERVAL_SECONDS="1",
        METRICS_PORT=str(free_loopback_port()),
    )
    stop_daemon.append(start_daemon(env, data))
    wait_for(lambda: health(env)["ok"], 30, "healthy")
    assert healthcheck(env).stdout.strip() == '{"ok": true, "env": "test", "log_level": "INFO", "workers": 2}'

    def watching() -> list[dict[str, Any]]:
        workers = health(env, "--verbose")["detail"]["workers"]
        return [
            w for w in workers if any(f["last_sync_age_seconds"] is not None for f in w.get("folders", []))
        ]

    wait_for(lambda: bool(watching()), 30, "a worker reports the sync of the folder it watches")
    (worker,) = watching()
    (folder,) = worker["folders"]
    assert folder["folder"] == "INBOX" and folder["last_sync_age_seconds"] < 5
    assert worker["uptime_seconds"] > 0 and worker["pid"] > 0

    dovecot.stop()
    wait_for(lambda: not health(env)["ok"], 60, "unhealthy while Dovecot is down")
    answer = health(env)
    assert answer["error_type"] == "ImapServerUnreachable", answer
    assert "no watched folder has synced" in answer["error"] and "INBOX" in answer["error"]
    detail = health(env, "--verbose")["detail"]
    (folder,) = [f for w in detail["workers"] for f in w.get("folders", [])]
    assert folder["last_error"]["error_type"] == "ImapServerUnreachable"

    back = time.time()
    dovecot.start()
    wait_for(lambda: health(env)["ok"], 90, "healthy again once Dovecot is back")
    # The metrics tell the same story: failures by kind, the reconnection, the folder's fresh sync.
    assert (scraped(env, "emailops_imap_errors_total", kind="connection") or 0) >= 1
    wait_for(lambda: (scraped(env, "emailops_imap_reconnects_total") or 0) >= 1, 30, "reconnect counted")
    last_sync = scraped(env, "emailops_folder_last_sync_timestamp_seconds", folder="INBOX")
    assert last_sync is not None and last_sync >= back


def test_the_healthcheck_says_why_no_folder_syncs(
    dovecot: LocalDovecot, data: Path, stop_daemon: list[Any]
) -> None:
    env = daemon_env(
        dovecot,
        data,
        HEALTH_MAX_SYNC_AGE_SECONDS="3",
        POLL_INTERVAL_SECONDS="1",
        METRICS_PORT=str(free_loopback_port()),
        EMAIL_FOLDERS="NoSuchFolder",
    )
    stop_daemon.append(start_daemon(env, data))
    wait_for(lambda: health(env).get("error_type") == "ImapFolderMissing", 60, "ImapFolderMissing")
    answer = health(env)
    assert answer["ok"] is False and list(answer) == ["ok", "error", "error_type"]
    assert env["EMAIL_PASSWORD"] not in json.dumps(answer)
    assert (scraped(env, "emailops_imap_errors_total", kind="folder_missing") or 0) >= 1
    assert scraped(env, "emailops_auth_failures_total", protocol="imap") is None


def test_a_refused_password_is_auth_failed_and_healthy_then_ok_after_a_restart_with_the_right_one(
    dovecot: LocalDovecot, data: Path, stop_daemon: list[Any]
) -> None:
    """One mailbox whose password is wrong: a restart would not fix it, so the container stays
    healthy; ``--verbose`` and the metrics say auth_failed. A restart with the right password
    signs in at once (not at the slow retry) and the account is ok."""
    env = daemon_env(
        dovecot,
        data,
        HEALTH_MAX_SYNC_AGE_SECONDS="3",
        POLL_INTERVAL_SECONDS="1",
        METRICS_PORT=str(free_loopback_port()),
        EMAIL_PASSWORD="not-the-password",
    )
    # The account's default name is EMAIL_USERNAME@EMAIL_IMAP_HOST: an address, so never a label.
    label = metrics.account_label(f"{ALICE}@{dovecot.host}")

    def accounts() -> list[dict[str, Any]]:
        return list(health(env, "--verbose").get("detail", {}).get("accounts", []))

    stop_daemon.append(start_daemon(env, data))
    wait_for(lambda: [row["state"] for row in accounts()] == ["auth_failed"], 60, "auth_failed")
    # Past HEALTH_MAX_SYNC_AGE_SECONDS from the worker's start, with no sync at all.
    wait_for(
        lambda: health(env, "--verbose")["detail"]["workers"][0].get("uptime_seconds", 0) > 4, 60, "uptime"
    )
    answer = health(env)
    assert answer["ok"] is True and list(answer) == ["ok", "env", "log_level", "workers"], answer
    [shown] = accounts()
    assert shown["account"] == f"{ALICE}@{dovecot.host}" and shown["metrics_label"] == label
    assert shown["error_kind"] == "auth" and "AUTHENTICATIONFAILED" in shown["error"]
    assert shown["next_attempt_in_seconds"] > 600
    assert env["EMAIL_PASSWORD"] not in json.dumps(shown)
    assert (scraped(env, "emailops_imap_errors_total", kind="auth") or 0) >= 1
    assert (scraped(env, "emailops_auth_failures_total", protocol="imap") or 0) >= 1
    assert scraped(env, "emailops_account_state", account=label, state="auth_failed") == 1
    assert scraped(env, "emailops_account_state", account=label, state="ok") == 0
    assert (scraped(env, "emailops_account_errors_total", account=label, kind="auth") or 0) >= 1
    first = stop_daemon.pop()
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)
    fixed = {**env, "EMAIL_PASSWORD": dovecot.password(ALICE)}
    stop_daemon.append(start_daemon(fixed, data))

    def ok() -> bool:
        try:
            return scraped(fixed, "emailops_account_state", account=label, state="ok") == 1
        except OSError:  # the new supervisor does not listen yet
            return False

    wait_for(ok, 60, "ok")
    assert "accounts" not in health(fixed, "--verbose").get("detail", {})
    assert (
        scraped(fixed, "emailops_account_last_sync_timestamp_seconds", account=label) or 0
    ) > time.time() - 60


def test_a_refused_smtp_sign_in_is_counted(dovecot: LocalDovecot, data: Path, stop_daemon: list[Any]) -> None:
    """The SMTP server does not know the account's password (IMAP does): the reply is retried later,
    counted as such, and the refusal as an SMTP sign-in failure (EmailOpsSignInRefused's input)."""
    with LocalSmtpRelay(dovecot, {ALICE: "not-alices-password"}) as relay:
        env = daemon_env(
            dovecot, data, EMAIL_SMTP_PORT=str(relay.port), METRICS_PORT=str(free_loopback_port())
        )
        stop_daemon.append(start_daemon(env, data))
        wait_for(lambda: health(env)["ok"], 30, "healthy")
        wait_for(lambda: first_synced(env["INDEX_DB_URL"]), 30, "the first sync: new mail from now on")
        dovecot.deliver(ALICE, inbound("help", n=1))

        def refused() -> bool:
            return (scraped(env, "emailops_auth_failures_total", protocol="smtp") or 0) >= 1

        wait_for(refused, 30, "the refused SMTP sign-in counted")
        assert (scraped(env, "emailops_smtp_errors_total", kind="transient") or 0) >= 1
        assert (scraped(env, "emailops_replies_total", rule="ack", outcome="retry") or 0) >= 1
        assert scraped(env, "emailops_auth_failures_total", protocol="imap") is None
        assert relay.accepted == []


def test_the_healthcheck_fails_while_smtp_refuses_the_sign_in_and_recovers_after_a_send(
    dovecot: LocalDovecot, data: Path, stop_daemon: list[Any]
) -> None:
    """IMAP works, the SMTP server refuses the password: healthy while no reply is due, unhealthy
    (SmtpSignInRefused) once a reply has been refused for longer than the limit, healthy again
    after the next reply is sent with the fixed credentials."""
    with LocalSmtpRelay(dovecot, {ALICE: "not-alices-password"}) as relay:
        env = daemon_env(
            dovecot,
            data,
            EMAIL_SMTP_PORT=str(relay.port),
            HEALTH_MAX_SYNC_AGE_SECONDS="3",
            POLL_INTERVAL_SECONDS="1",
        )
        stop_daemon.append(start_daemon(env, data))

        def worker() -> dict[str, Any]:
            """The worker's view in ``--verbose`` ({} before the supervisor wrote its state)."""
            workers = health(env, "--verbose").get("detail", {}).get("workers", [{}])
            return dict(workers[0])

        # No reply due: SMTP unused for longer than the limit, and healthy.
        wait_for(lambda: worker().get("uptime_seconds", 0) > 5, 30, "the worker ran past the limit")
        assert worker()["smtp"] == {
            "last_sign_in_age_seconds": None,
            "refused_for_seconds": None,
            "last_error": None,
        }
        assert (
            healthcheck(env).stdout.strip()
            == '{"ok": true, "env": "test", "log_level": "INFO", "workers": 1}'
        )

        wait_for(lambda: first_synced(env["INDEX_DB_URL"]), 30, "the first sync: new mail from now on")
        dovecot.deliver(ALICE, inbound("help", n=1))
        wait_for(lambda: health(env).get("error_type") == "SmtpSignInRefused", 60, "SmtpSignInRefused")
        answer = health(env)
        assert answer["ok"] is False and list(answer) == ["ok", "error", "error_type"]
        assert answer["error"].startswith(
            f"the SMTP server 127.0.0.1:{relay.port} has refused the account's sign-in"
        )
        assert "authentication failed: 535" in answer["error"]
        assert "check EMAIL_USERNAME/EMAIL_PASSWORD" in answer["error"]
        assert env["EMAIL_PASSWORD"] not in json.dumps(health(env, "--verbose"))
        smtp = worker()["smtp"]
        assert smtp["last_sign_in_age_seconds"] is None and smtp["refused_for_seconds"] > 3
        assert smtp["last_error"]["error_type"] == "SmtpSignInRefused"
        assert relay.accepted == []

        relay.set_password(ALICE, env["EMAIL_PASSWORD"])
        # Another sender: the rule answers each address once; the first reply waits out its backoff.
        dovecot.deliver(ALICE, inbound("help", sender="Carol <carol@example.org>", n=2))
        (sent,) = relay.wait_for_accepted(1, timeout=60)
        assert sent.rcpt_tos == ("carol@example.org",)
        wait_for(lambda: health(env)["ok"], 30, "healthy again after the reply was sent")
        smtp = worker()["smtp"]
        assert smtp["refused_for_seconds"] is None and smtp["last_sign_in_age_seconds"] is not None
        assert smtp["last_error"]["error_type"] == "SmtpSignInRefused"  # kept, no longer current


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 15 rules found" in check.stdout, check
    unit = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],
        cwd=ALERTS.parent,
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_the_example_prometheus_config_loads_the_rules() -> None:
    config = ALERTS.parent / "prometheus.yml"
    check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 1 rule files found" in check.stdout, check


def test_the_compose_profile_monitoring_runs_prometheus_with_the_rules(tmp_path: Path) -> None:
    compose = shutil.which("podman-compose")
    if compose is None:
        pytest.fail("podman-compose is missing: pip install -r requirements-test.txt")
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text("METRICS_PORT=9464\nMETRICS_ADDR=0.0.0.0\n")
    plain = subprocess.run(
        [compose, "-f", "docker-compose.yml", "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    monitoring = subprocess.run(
        [compose, "--profile", "monitoring", "-f", "docker-compose.yml", "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode == 0 and monitoring.returncode == 0, plain.stderr + monitoring.stderr
    import yaml  # PyYAML, installed with podman-compose

    plain_services = yaml.safe_load(plain.stdout)["services"]
    services = yaml.safe_load(monitoring.stdout)["services"]
    # Only the console, on the host's loopback.
    assert set(plain_services) == {"app"}
    assert plain_services["app"]["ports"] == ["127.0.0.1:8080:8080"], plain_services["app"]["ports"]
    assert set(services) == {"app", "prometheus"}
    prometheus = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert any(v.startswith("./examples/prometheus:/etc/prometheus") for v in prometheus["volumes"])
