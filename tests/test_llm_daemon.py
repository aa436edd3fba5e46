"""Model replies in the daemon as operators run it (python -m prod.run) and from the command line:
a worker SIGKILLed during a model call, the key at LOG_LEVEL=DEBUG, ``emailops rules test``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from localmail.dovecot import LocalDovecot, free_loopback_port
from localmail.smtp_relay import LocalSmtpRelay
from tests.chat_server import ChatServer
from tests.index_helpers import ALICE, daemon_env, first_synced, index_engine, rows
from tests.test_daemon_e2e import REPO, healthcheck, supervisor_state, wait_for

KEY = "sk-live-Zq8Wm3Rt5Yu7Io9Pa1Sd"
MODEL_TEXT = "Hello Bob, your parcel left our depot this morning (ref WALLABY-7)."
RULES = (
    '[[rules]]\nname = "ai-draft"\n[rules.match]\nsubject = "help"\n[rules.reply]\n'
    'llm_prompt = "Write a short answer to {sender_name}:\\n{body}"\n'
)
BOB = "bob@example.test"


def inbound(n: int, body: str, *, sender: str = f"Bob <{BOB}>", extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: {ALICE}\r\nSubject: help with order {n}\r\n"
        f"Message-ID: <order-{n}@example.test>\r\nDate: Tue, 2 Jan 2024 10:00:00 +0000\r\n{extra}\r\n"
        f"{body}\r\n"
    ).encode()


def drafts(dovecot: LocalDovecot) -> list[bytes]:
    with dovecot.imap(ALICE) as client:
        client.select_folder("Drafts", readonly=True)
        return [d[b"BODY[]"] for d in client.fetch(client.search("ALL"), ["BODY.PEEK[]"]).values()]


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    with ChatServer(reply=lambda _r: MODEL_TEXT) as server:
        yield server


@pytest.fixture
def env(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, chat: ChatServer, tmp_path: Path
) -> dict[str, str]:
    (tmp_path / "rules.toml").write_text(RULES)
    dovecot.create_folder(ALICE, "Drafts")
    return daemon_env(
        dovecot,
        tmp_path,
        WORKERS="1",
        LOG_LEVEL="DEBUG",
        LOG_FILE_ENABLED="true",
        EMAIL_SMTP_PORT=str(smtp_relay.port),
        HEARTBEAT_TIMEOUT_SECONDS="20",
        SHUTDOWN_TIMEOUT_SECONDS="10",
        LLM_BASE_URL=chat.base_url,
        LLM_API_KEY=KEY,
        LLM_MODEL="tiny-model",
        LLM_TIMEOUT_SECONDS="15",
    )


def emailops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailops", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sigkill_during_a_model_call_ends_with_one_draft_and_the_key_is_in_no_output(
    env: dict[str, str], dovecot: LocalDovecot, chat: ChatServer, tmp_path: Path
) -> None:
    chat.release.clear()  # every call waits until the test lets it answer
    # Streamed answers here (rules test below asks for whole ones): tokens come in the last chunk.
    env = {**env, "METRICS_PORT": str(free_loopback_port()), "LLM_STREAM": "true"}
    with (tmp_path / "stdout.log").open("w") as stdout, (tmp_path / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, stdout=stdout, stderr=stderr
        )
    try:
        wait_for(lambda: healthcheck(env).returncode == 0, 30, "healthy")
        wait_for(lambda: first_synced(env["INDEX_DB_URL"]), 30, "the first sync: new mail from now on")
        dovecot.deliver(ALICE, inbound(1, "Where is my parcel? Tracking says KOALA-42."))
        wait_for(chat.started.is_set, 30, "the model was called")
        state = supervisor_state(tmp_path)
        assert state is not None and len(state.workers) == 1
        victim = state.workers[0].pid
        os.kill(victim, signal.SIGKILL)
        chat.release.set()

        def replaced() -> bool:
            s = supervisor_state(tmp_path)
            return s is not None and victim not in {w.pid for w in s.workers}

        wait_for(replaced, 30, "worker replaced")
        wait_for(lambda: len(drafts(dovecot)) == 1, 30, "the draft saved after the restart")
        engine = index_engine(env["INDEX_DB_URL"])
        wait_for(
            lambda: rows(engine, "SELECT state FROM outbox") == [("sent",)],
            30,
            "the draft's outbox row is done",
        )
        assert rows(engine, "SELECT state, attempts FROM llm_jobs") == [("done", 2)]
        engine.dispose()
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", timeout=10)
        exposition = scraped.read().decode()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    [draft] = drafts(dovecot)
    assert MODEL_TEXT in message_from_bytes(draft).get_payload(decode=True).decode()
    assert len(chat.requests) == 2  # the killed call and the retried one
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in chat.requests)
    assert all(r.body["stream"] is True for r in chat.requests)

    stdout_text = (tmp_path / "stdout.log").read_text()
    stderr_text = (tmp_path / "stderr.log").read_text()
    log_file = (tmp_path / "logs" / "app.log").read_text()
    llm_lines = [json.loads(line) for line in log_file.splitlines() if '"component":"llm"' in line]
    calls = [r for r in llm_lines if r["message"] == "model call"]
    assert [c["outcome"] for c in calls] == ["ok"]
    assert calls[0]["latency_ms"] >= 0 and calls[0]["tokens_in"] > 0 and calls[0]["tokens_out"] > 0
    assert '"level":"DEBUG"' in log_file

    check = emailops(env, "check-config", "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["LLM_API_KEY"] == "**********"
    listing = emailops(env, "llm", "list", "--json")
    assert [(j["state"], j["attempts"], j["action"]) for j in json.loads(listing.stdout)] == [
        ("done", 2, "draft")
    ]
    # Model calls by outcome, their duration and tokens (the killed call never finished).
    assert re.search(r'emailops_llm_calls_total\{outcome="ok",rule="[^"]+"\} 1\.0', exposition)
    assert "emailops_llm_call_duration_seconds_count 1.0" in exposition
    tokens_out = re.search(r'emailops_llm_tokens_total\{direction="out"\} ([0-9.]+)', exposition)
    assert tokens_out and float(tokens_out.group(1)) == calls[0]["tokens_out"]
    for name, output in (
        ("metrics", exposition),
        ("stdout", stdout_text),
        ("stderr", stderr_text),
        ("log file", log_file),
        ("check-config", check.stdout + check.stderr),
        ("llm list", listing.stdout + listing.stderr),
    ):
        assert KEY not in output, name
    # Neither the message's text nor the model's answer is logged at INFO (at DEBUG the IMAP
    # library traces the protocol, message and draft included).
    above_debug = [line for line in stdout_text.splitlines() if '"level":"DEBUG"' not in line]
    assert above_debug and all("KOALA-42" not in line and "WALLABY-7" not in line for line in above_debug)


def test_rules_test_prints_the_decision_and_the_draft_and_records_nothing(
    env: dict[str, str], chat: ChatServer, smtp_relay: LocalSmtpRelay, tmp_path: Path
) -> None:
    asking = tmp_path / "asking.eml"
    asking.write_bytes(inbound(7, "Can I change my delivery address?"))
    robot = tmp_path / "robot.eml"
    robot.write_bytes(inbound(8, "out of office", extra="Auto-Submitted: auto-replied\r\n"))

    chat.reply = lambda _r: MODEL_TEXT + "\n\nBest regards,\nSupport"
    answered = emailops(env, "rules", "test", str(asking))
    assert answered.returncode == 0, answered.stderr
    out = answered.stdout
    assert "rule 'ai-draft': matches; reply (draft)" in out
    assert "decision: would reply" in out
    assert "draft saved to the Drafts folder would be:" in out
    assert f"To: Bob <{BOB}>" in out and "Subject: Re: help with order 7" in out
    assert "In-Reply-To: <order-7@example.test>" in out
    # The body is indented like the headers, every line of it.
    assert f"    {MODEL_TEXT}\n\n    Best regards,\n    Support\n" in out
    assert "model tiny-model:" in out
    # The trial's decisions are rolled back: no "reply recorded" line says otherwise.
    assert answered.stderr.splitlines() == ["nothing was sent or saved"]
    assert "Can I change my delivery address?" in chat.requests[0].prompt
    assert chat.requests[0].body["stream"] is False

    suppressed = emailops(env, "rules", "test", "--json", str(robot))
    [outcome] = json.loads(suppressed.stdout)
    assert outcome["verdict"] == "suppressed" and "auto-replied" in outcome["reason"]
    assert outcome["reply"] is None
    assert len(chat.requests) == 1  # a robot costs no model call

    engine = index_engine(env["INDEX_DB_URL"])
    assert rows(engine, "SELECT count(*) FROM llm_jobs") == [(0,)]
    assert rows(engine, "SELECT count(*) FROM outbox") == [(0,)]
    assert rows(engine, "SELECT count(*) FROM llm_calls") == [(0,)]
    engine.dispose()
    assert smtp_relay.accepted == []
    assert KEY not in answered.stdout + answered.stderr + suppressed.stdout + suppressed.stderr


def test_a_rule_asking_a_model_without_llm_base_url_stops_start_up(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if not k.startswith("LLM_")}
    started = subprocess.run(
        [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 78
    [record] = [json.loads(line) for line in started.stdout.splitlines()]
    assert "LLM_BASE_URL: missing" in record["message"] and '"ai-draft"' in record["message"]
    check = emailops(env, "check-config")
    assert check.returncode == 78 and "LLM_BASE_URL: missing" in check.stderr
