"""Real sentry-sdk envelopes sent to a local HTTP endpoint: events arrive, tagged, with no secret."""

from __future__ import annotations

import gzip
import json
import signal
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import emailops
from prod.error_tracking import WITHHELD
from tests.shell_workers import PASSWORD, SupervisorProcess, run_python, shell_env, wait_until

pytestmark = pytest.mark.timeout(60)


class _SentryEndpoint(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EnvelopeHandler)
        self.raw_envelopes: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server_address[1]}/1"

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            raws = list(self.raw_envelopes)
        events = []
        for raw in raws:
            lines = raw.split(b"\n")
            # Envelope: a header line, then (item header, payload) pairs.
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if header.strip() and json.loads(header).get("type") == "event":
                    events.append(json.loads(payload))
        return events


class _EnvelopeHandler(BaseHTTPRequestHandler):
    server: _SentryEndpoint

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding == "br":
            import brotli  # type: ignore[import-not-found]

            body = brotli.decompress(body)
        with self.server.lock:
            self.server.raw_envelopes.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[_SentryEndpoint]:
    server = _SentryEndpoint()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _assert_no_secret(endpoint: _SentryEndpoint) -> None:
    for raw in endpoint.raw_envelopes:
        assert PASSWORD.encode() not in raw
        assert json.dumps(PASSWORD)[1:-1].encode() not in raw


def test_worker_errors_reach_sentry_tagged_and_scrubbed(tmp_path: Path, endpoint: _SentryEndpoint) -> None:
    env = shell_env(
        tmp_path,
        SENTRY_DSN=endpoint.dsn,
        ENV="staging",
        EMAILOPS_WORKER_TARGET="tests.shell_workers:failing_unit",
    )
    with SupervisorProcess(tmp_path, env) as supervisor:
        event = wait_until(
            lambda: next((e for e in endpoint.events() if e.get("tags", {}).get("worker") == "1"), None), 30
        )
        supervisor.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert supervisor.wait(timeout=15) == 0
        stdout = "\n".join(supervisor.stdout_lines())
    assert event, "no event from worker 1"
    assert event["environment"] == "staging"
    assert event["release"] == emailops.__version__
    assert event["level"] == "error"
    assert event["logentry"]["message"].startswith("work unit failed")
    exception = event["exception"]["values"][-1]
    assert exception["type"] == "RuntimeError"
    assert "**********" in exception["value"]
    frames = exception["stacktrace"]["frames"]
    assert frames and all("vars" not in frame for frame in frames)
    assert "request" not in event
    _assert_no_secret(endpoint)
    assert PASSWORD not in stdout


def test_unhandled_exception_is_sent_and_flushed_on_exit(tmp_path: Path, endpoint: _SentryEndpoint) -> None:
    env = shell_env(tmp_path, SENTRY_DSN=endpoint.dsn)
    code = """
from prod.runtime_settings import RuntimeSettings
from prod.logging_setup import configure_logging, get_logger
from prod.error_tracking import init_error_tracking

settings = RuntimeSettings.from_env()
configure_logging(settings, process_role="supervisor")
init_error_tracking(settings, worker=None)
password = settings.email_password.get_secret_value()
get_logger("smtp").info("breadcrumb with Authorization: Bearer " + password)
raise ConnectionError("IMAP login failed: LOGIN bob " + password)
"""
    result = run_python(tmp_path, env, code)
    assert result.returncode == 1
    events = endpoint.events()
    assert len(events) == 1, result.stdout
    event = events[0]
    assert event["tags"]["worker"] == "supervisor"
    assert event["environment"] == "test"
    assert event["exception"]["values"][-1]["type"] == "ConnectionError"
    assert event["exception"]["values"][-1]["mechanism"]["handled"] is False
    crumbs = event.get("breadcrumbs", {}).get("values", [])
    assert any("Authorization: Bearer **********" in str(c.get("message")) for c in crumbs)
    _assert_no_secret(endpoint)
    assert PASSWORD not in result.stdout + result.stderr
    # The unhandled exception was logged as one JSON line too.
    assert json.loads(result.stdout.splitlines()[-1])["level"] == "CRITICAL"


_PERSONAL = ("hans.mueller@example.org", "Merger plans for Q3", "please keep the merger quiet")
_BREADCRUMB_RUN = """
import logging
from sqlalchemy import text
from prod.runtime_settings import RuntimeSettings
from prod.logging_setup import configure_logging, get_logger
from prod.error_tracking import init_error_tracking
from emailops.store.database import create_index_engine

settings = RuntimeSettings.from_env()
configure_logging(settings, process_role="supervisor")
init_error_tracking(settings, worker=None)
recipient, subject, body = {personal!r}
log = get_logger("replies")
log.info("reply queued", recipient=recipient, subject=subject)
# At LOG_LEVEL=DEBUG SQLAlchemy logs each statement with its parameters at INFO.
engine = create_index_engine(settings.index_db_url)
with engine.connect() as connection:
    values = dict(recipient=recipient, subject=subject, body=body)
    connection.execute(text("SELECT :recipient, :subject, :body"), values)
logging.getLogger("imapclient").warning("unexpected untagged response: %r", subject)
logging.getLogger("urllib3").warning("Subject: " + subject)
log.error("delivery stopped")
"""


def _breadcrumbs(tmp_path: Path, endpoint: _SentryEndpoint, **overrides: str) -> list[dict[str, Any]]:
    env = shell_env(
        tmp_path,
        SENTRY_DSN=endpoint.dsn,
        LOG_LEVEL="DEBUG",
        INDEX_DB_URL=f"sqlite:///{tmp_path}/i.db",
        **overrides,
    )
    code = _BREADCRUMB_RUN.format(personal=_PERSONAL)
    result = run_python(tmp_path, env, code)
    assert result.returncode == 0, result.stderr
    (event,) = [e for e in endpoint.events() if e["logentry"]["message"] == "delivery stopped"]
    crumbs: list[dict[str, Any]] = event["breadcrumbs"]["values"]
    return crumbs


def test_breadcrumbs_carry_no_recipient_subject_or_text_by_default(
    tmp_path: Path, endpoint: _SentryEndpoint
) -> None:
    crumbs = _breadcrumbs(tmp_path, endpoint)
    for raw in endpoint.raw_envelopes:
        for personal in _PERSONAL:
            assert personal.encode() not in raw
    by_category = {crumb["category"]: crumb["message"] for crumb in crumbs}
    assert by_category["emailops.replies"] == "reply queued"
    assert by_category["imapclient"] == "unexpected untagged response: %r"
    assert by_category["urllib3"] == WITHHELD
    sql = [crumb["message"] for crumb in crumbs if crumb["category"].startswith("sqlalchemy.engine")]
    assert "[%s] %r" in sql  # the parameters' line, without the parameters
    # The statement ran under Sentry (its log lines above), but the SDK's breadcrumb of it is dropped.
    assert "query" not in by_category


def test_breadcrumbs_carry_the_text_with_sentry_send_pii(tmp_path: Path, endpoint: _SentryEndpoint) -> None:
    crumbs = _breadcrumbs(tmp_path, endpoint, SENTRY_SEND_PII="true")
    messages = "\n".join(str(crumb["message"]) for crumb in crumbs)
    for personal in _PERSONAL:
        assert personal in messages
    _assert_no_secret(endpoint)


_CONNECT_RUN = """
import select
from prod.runtime_settings import RuntimeSettings
from prod.logging_setup import configure_logging, get_logger
from prod.error_tracking import init_error_tracking
from emailops.imap.background_connect import ConnectAttempt
from emailops.imap.errors import ImapAuthError

settings = RuntimeSettings.from_env()
configure_logging(settings, process_role="supervisor")
init_error_tracking(settings, worker=None)

def open_connection():
    get_logger("auth").warning("token request failed")
    raise ImapAuthError("sign-in refused")

attempt = ConnectAttempt(open_connection)
assert select.select([attempt.ready_socket()], [], [], 20)[0], "the attempt did not finish"
try:
    attempt.result()
except ImapAuthError:
    get_logger("imap").error("sign-in refused")
"""


def test_lines_logged_while_connecting_on_a_thread_are_breadcrumbs_of_the_callers_event(
    tmp_path: Path, endpoint: _SentryEndpoint
) -> None:
    """A worker connects on a thread (``background_connect``) and logs the refusal on its own: the
    event carries what the connecting thread logged before it."""
    result = run_python(tmp_path, shell_env(tmp_path, SENTRY_DSN=endpoint.dsn), _CONNECT_RUN)
    assert result.returncode == 0, result.stderr
    (event,) = [e for e in endpoint.events() if e["logentry"]["message"] == "sign-in refused"]
    crumbs = [crumb["message"] for crumb in event["breadcrumbs"]["values"]]
    assert "token request failed" in crumbs, crumbs
