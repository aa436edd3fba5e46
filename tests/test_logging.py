"""JSON log lines, the single writer of the log file, daily rotation, and redaction at DEBUG."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from prod.logging_setup import KEY_ORDER, LOG_FILE_BACKUPS, _RotatingFileSink
from tests.shell_workers import PASSWORD, SupervisorProcess, run_python, shell_env, wait_until

pytestmark = pytest.mark.timeout(60)

REQUIRED_KEYS = ("ts", "level", "logger", "message", "pid", "thread")
USERNAME = "bob@example.test"


def _assert_log_line(line: str) -> dict[str, object]:
    record = json.loads(line)
    assert list(record)[: len(REQUIRED_KEYS)] == list(REQUIRED_KEYS), line
    assert ": " not in line.split('"message"')[0] and ', "' not in line, "compact separators"
    assert record["level"] == str(record["level"]).upper()
    assert datetime.fromisoformat(str(record["ts"])).utcoffset() == UTC.utcoffset(None)
    return record


def test_structlog_and_stdlib_records_render_alike(tmp_path: Path) -> None:
    env = shell_env(tmp_path, LOG_LEVEL="INFO")
    result = run_python(
        tmp_path,
        env,
        """
        import logging, structlog
        from prod.runtime_settings import RuntimeSettings
        from prod.logging_setup import configure_logging, get_logger

        pipeline = configure_logging(RuntimeSettings.from_env(), process_role="supervisor")
        log = get_logger("imap", folder="INBOX")
        log.info("fetched", uid=42)
        with structlog.contextvars.bound_contextvars(request_id="req-1"):
            logging.getLogger("sqlalchemy.pool").warning("pool %s exhausted", "main")
        logging.getLogger("emailops.index.store").info("stdlib info")
        log.debug("hidden at INFO")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("unit failed")
        logging.getLogger("urllib3").info("hidden: library held at WARNING below DEBUG")
        pipeline.close()
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    records = [_assert_log_line(line) for line in lines]
    assert [r["message"] for r in records] == ["fetched", "pool main exhausted", "stdlib info", "unit failed"]
    fetched, pool, stdlib, failed = records
    assert fetched["logger"] == "emailops.imap"
    assert (fetched["component"], fetched["folder"], fetched["uid"]) == ("imap", "INBOX", 42)
    assert (pool["level"], pool["component"], pool["request_id"]) == ("WARNING", "index", "req-1")
    assert stdlib["component"] == "index"
    assert failed["level"] == "ERROR" and "ZeroDivisionError" in str(failed["exception"])
    assert list(fetched)[: len(KEY_ORDER) - 1] == list(KEY_ORDER[:-1])
    assert sum('"level":"ERROR"' in line for line in lines) == 1
    # The supervisor also writes the file, the same lines.
    assert (tmp_path / "logs" / "app.log").read_text().splitlines() == lines


def test_cli_logs_to_stderr_only(tmp_path: Path) -> None:
    env = shell_env(tmp_path, LOG_LEVEL="DEBUG")
    result = run_python(
        tmp_path,
        env,
        """
        from prod.runtime_settings import RuntimeSettings
        from prod.logging_setup import configure_logging, get_logger
        configure_logging(RuntimeSettings.from_env(), process_role="cli")
        get_logger("cli").debug("checking", command="stats")
        print("the command's output")
        """,
    )
    assert result.returncode == 0
    assert result.stdout == "the command's output\n"
    record = _assert_log_line(result.stderr.strip())
    assert (record["level"], record["component"], record["command"]) == ("DEBUG", "cli", "stats")
    assert not (tmp_path / "logs").exists()


def test_two_workers_log_into_one_file_through_the_supervisor(tmp_path: Path) -> None:
    env = shell_env(tmp_path, WORKERS="2", SHELL_WORKER_UNIT_SECONDS="0.05")
    with SupervisorProcess(tmp_path, env) as supervisor:
        assert wait_until(lambda: len(supervisor.worker_pids()) == 2, 20)
        log_file = tmp_path / "logs" / "app.log"
        assert wait_until(lambda: log_file.read_text().count("unit done") >= 40, 20)
        supervisor.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert supervisor.wait(timeout=15) == 0
        stdout_lines = supervisor.stdout_lines()
    file_lines = log_file.read_text().splitlines()
    records = [_assert_log_line(line) for line in file_lines]
    assert file_lines == stdout_lines
    unit_pids = {r["pid"] for r in records if r["message"].startswith("unit done")}  # type: ignore[union-attr]
    assert len(unit_pids) == 2
    assert {r["worker"] for r in records if r["pid"] in unit_pids} == {1, 2}
    assert records[-1]["message"] == "supervisor stopped"
    # Each worker's units are all there, in order, none lost or doubled.
    for pid in unit_pids:
        done = [
            int(str(r["message"]).split()[-1])
            for r in records
            if r["pid"] == pid and "unit done" in r["message"]
        ]  # type: ignore[operator]
        assert done == list(range(1, len(done) + 1))


def test_daily_rotation_keeps_seven_files(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "app.log"
    sink = _RotatingFileSink(path)
    handler = sink.handler
    assert (handler.when, handler.utc, handler.backupCount) == ("MIDNIGHT", True, LOG_FILE_BACKUPS)
    first_midnight = datetime(2025, 10, 1, tzinfo=UTC).timestamp()
    for day in range(10):
        sink.write(json.dumps({"day": day}))
        # The clock reaches the next midnight: doRollover names the backup after the day it closes.
        handler.rolloverAt = int(first_midnight + (day + 1) * 86400)
        handler.doRollover()
    sink.write(json.dumps({"day": 10}))
    sink.close()
    backups = sorted(p.name for p in path.parent.iterdir() if p.name != "app.log")
    assert backups == [f"app.log.2025-10-{day:02d}" for day in range(4, 11)]
    assert json.loads((path.parent / "app.log.2025-10-10").read_text()) == {"day": 9}
    assert json.loads(path.read_text()) == {"day": 10}


def test_rollover_happens_when_the_clock_passes_midnight(tmp_path: Path) -> None:
    sink = _RotatingFileSink(tmp_path / "app.log")
    sink.write('{"n":1}')
    sink.handler.rolloverAt = 0  # midnight is already past
    sink.write('{"n":2}')
    sink.close()
    backups = [p for p in tmp_path.iterdir() if re.fullmatch(r"app\.log\.\d{4}-\d{2}-\d{2}", p.name)]
    assert len(backups) == 1 and backups[0].read_text() == '{"n":1}\n'
    assert (tmp_path / "app.log").read_text() == '{"n":2}\n'


def _smtp_server_with_auth():  # type: ignore[no-untyped-def]
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        return AuthResult(success=auth_data.password == PASSWORD.encode())

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(
        Handler(), hostname="127.0.0.1", port=port, authenticator=authenticator, auth_require_tls=False
    )
    controller.start()
    return controller, port


def test_no_secret_at_debug_in_imap_smtp_and_url_output(tmp_path: Path) -> None:
    controller, port = _smtp_server_with_auth()
    try:
        env = shell_env(tmp_path, LOG_LEVEL="DEBUG", SMTP_TEST_PORT=str(port))
        result = run_python(
            tmp_path,
            env,
            r"""
            import base64, logging, os, smtplib
            from imapclient.imapclient import IMAPlibLoggerAdapter
            from prod.runtime_settings import RuntimeSettings
            from prod.logging_setup import configure_logging

            settings = RuntimeSettings.from_env()
            password = settings.email_password.get_secret_value()
            user = settings.email_username
            pipeline = configure_logging(settings, process_role="supervisor")

            # imapclient's protocol loggers: its own command log and imaplib's, through its adapter.
            protocol = logging.getLogger("imapclient.imapclient")
            protocol.debug("> %s", b'ABCD1 LOGIN "' + user.encode() + b'" "' + password.encode() + b'"')
            protocol.debug("   (literal) > %s", password.encode())
            imaplib_log = IMAPlibLoggerAdapter(logging.getLogger("imapclient.imaplib"), {})
            imaplib_log.debug("> b'ABCD2 AUTHENTICATE PLAIN'")
            plain = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            logging.getLogger("imaplib").debug("write literal size %d: %r", len(plain), plain)
            logging.getLogger("imaplib").debug("> b'ABCD3 LOGIN bob %s'", password)

            # smtplib's debug output (printed to stderr by the stdlib), AUTH PLAIN then AUTH LOGIN.
            for mechanism in ("PLAIN", "LOGIN"):
                smtp = smtplib.SMTP("127.0.0.1", int(os.environ["SMTP_TEST_PORT"]), timeout=10)
                smtp.set_debuglevel(2)
                smtp.ehlo()
                smtp.user, smtp.password = user, password
                smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower()))
                smtp.quit()

            # SQLAlchemy-style URLs and HTTP headers.
            logging.getLogger("sqlalchemy.engine").debug("url postgresql+psycopg://bob:%s@db/x", password)
            logging.getLogger("urllib3").debug("headers {'Authorization': 'Basic %s'}", plain.decode())
            pipeline.close()
            """,
        )
    finally:
        controller.stop()
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "smtplib's debug output must go through the pipeline"
    output = result.stdout + (tmp_path / "logs" / "app.log").read_text()
    forbidden = {
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(b"\0" + USERNAME.encode() + b"\0" + PASSWORD.encode()).decode(),
        json.dumps(PASSWORD)[1:-1],
    }
    for secret in forbidden:
        assert secret not in output
    records = [_assert_log_line(line) for line in result.stdout.splitlines()]
    messages = [str(r["message"]) for r in records]
    smtp_lines = [m for r, m in zip(records, messages, strict=True) if r["logger"] == "smtplib"]
    assert any("AUTH PLAIN **********" in m for m in smtp_lines), smtp_lines
    # Both logins succeeded: the secrets were really sent, in both mechanisms.
    assert sum("retcode (235)" in m for m in smtp_lines) == 2, smtp_lines
    assert any("LOGIN **" in m for m in messages)
    assert any("postgresql+psycopg://bob:**********@db/x" in m for m in messages)
    assert all(r["component"] == "smtp" for r in records if r["logger"] == "smtplib")


DB_PASSWORD = "Db p@ss/w0rd%q!"  # characters a URL must percent-encode


def test_database_password_is_masked_decoded_and_percent_encoded(tmp_path: Path) -> None:
    written = quote(DB_PASSWORD, safe="")
    env = shell_env(tmp_path, INDEX_DB_URL=f"postgresql+psycopg://emailops:{written}@127.0.0.1:5432/emailops")
    result = run_python(
        tmp_path,
        env,
        f"""
        import logging
        from prod.runtime_settings import RuntimeSettings
        from prod.logging_setup import configure_logging

        settings = RuntimeSettings.from_env()
        pipeline = configure_logging(settings, process_role="supervisor")
        # As a driver holds it (decoded) and as the URL spells it.
        logging.getLogger("psycopg").warning("options: %r", {{"dbname": "x", "p": {DB_PASSWORD!r}}})
        logging.getLogger("sqlalchemy.engine").warning("url as written: %s", {written!r})
        pipeline.close()
        """,
    )
    assert result.returncode == 0, result.stderr
    messages = [str(_assert_log_line(line)["message"]) for line in result.stdout.splitlines()]
    assert "options: {'dbname': 'x', 'p': '**********'}" in messages
    assert "url as written: **********" in messages
    output = result.stdout + (tmp_path / "logs" / "app.log").read_text()
    for spelling in (DB_PASSWORD, written, json.dumps(DB_PASSWORD)[1:-1]):
        assert spelling not in output
