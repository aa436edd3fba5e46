"""The zero-setup demo (``bin/run`` without a mail account): indexing, a search hit and an
automatic reply within a minute, then a clean stop on SIGTERM."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from localmail import demo
from prod import heartbeat

REPO = Path(__file__).resolve().parent.parent
WITHIN_SECONDS = 60


def _configured_dot_env() -> bool:
    env_file = REPO / ".env"
    return (
        env_file.is_file()
        and re.search(r"^\s*EMAIL_IMAP_HOST\s*=\s*\S", env_file.read_text(), re.M) is not None
    )


def _read_lines_until(process: subprocess.Popen[str], done: str, deadline: float) -> list[str]:
    """stderr lines of ``process`` up to and including the first one containing ``done``."""
    assert process.stderr is not None
    lines: list[str] = []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if done in line:
                return lines
    raise AssertionError(f"no {done!r} within {WITHIN_SECONDS} s; the demo said:\n" + "\n".join(lines))


def _console_sign_in(base: str, name: str, password: str) -> str:
    """Sign in with the console's form; the address of the page the browser ends on."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(base + "sign-in", timeout=10) as page:
        token = re.search(r'name="sign_in_token" value="([^"]+)"', page.read().decode())
    assert token is not None
    form = urllib.parse.urlencode(
        {"username": name, "password": password, "sign_in_token": token[1], "next": "/"}
    ).encode()
    request = urllib.request.Request(base + "sign-in", data=form, headers={"Origin": base.rstrip("/")})  # noqa: S310
    try:
        with opener.open(request, timeout=30) as answer:
            return str(answer.url)
    except urllib.error.HTTPError as refused:
        return str(refused.url)


def test_sample_messages_are_crlf_and_parse() -> None:
    from emailops.mime.parse import parse_message

    messages = demo.sample_messages()
    assert len(messages) >= 5
    for raw in messages:
        assert b"\n" not in raw.replace(b"\r\n", b"")
        assert parse_message(raw).subject


def test_demo_indexes_searches_replies_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(("EMAIL_", "INDEX_DB_URL"))
    }
    # bin/run chooses the demo when no account is configured; a developer's own .env would make
    # it run the real daemon, so then the demo module is started directly.
    command = (
        [sys.executable, "-m", "localmail.demo"] if _configured_dot_env() else [str(REPO / "bin" / "run")]
    ) + ["--data-dir", str(data_dir)]
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        said = _read_lines_until(process, "automatic reply delivered", started + WITHIN_SECONDS)
        elapsed = time.monotonic() - started
        text = "\n".join(said)
        assert re.search(r"indexed \d+ messages", text), text
        assert "search 'invoice': INBOX:" in text and "Invoice #4711 for October" in text, text
        assert "'Re: Need help with my order'" in text, text
        assert elapsed < WITHIN_SECONDS

        # The demo's settings file works with the real CLI, as it tells the operator.
        settings = dict(
            line.split("=", 1) for line in (data_dir / "demo.env").read_text().splitlines() if "=" in line
        )
        search = subprocess.run(
            [sys.executable, "-m", "emailops", "search", "--json", "zürich"],
            env={**env, **settings},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert search.returncode == 0, search.stderr
        subjects = {hit["subject"] for hit in json.loads(search.stdout)}
        assert subjects == {"Treffen in Zürich am Donnerstag", "Welcome to the EmailOps demo"}

        # The console answers on the address printed, and its password signs the admin in.
        console = re.search(r"operator console: (http://\S+/) user admin, password (\S+) ", text)
        assert console is not None, text
        assert _console_sign_in(console[1], "admin", console[2]) == console[1]
        assert _console_sign_in(console[1], "admin", "not the password printed") == console[1] + "sign-in"

        log = (data_dir / "logs" / "app.log").read_text()
        assert '"component":"index"' in log and '"message":"folder synced"' in log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            _, remaining = process.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail("the demo did not stop within 45 s of SIGTERM")
    assert process.returncode == 0, remaining
    assert "the daemon stopped with exit code 0" in remaining, remaining
    # Nothing is left running: neither the daemon nor the Dovecot it talked to.
    # The supervisor removes its state file when it has stopped.
    assert heartbeat.read_state(data_dir / "state") is None
    imap_port = int(re.search(r"Dovecot on 127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", imap_port), timeout=2).close()
