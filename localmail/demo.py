"""``python -m localmail.demo``: EmailOps working within a minute, with no mail account of one's own.

It starts a throwaway Dovecot (IMAP + LMTP) and an SMTP relay into it on loopback
(``localmail``, the servers of the test suite), with two accounts: ``demo@example.test``,
the mailbox EmailOps watches, and ``visitor@example.org``, where automatic replies land. It loads
the sample mail of ``examples/demo-mail/*.eml``, points the settings at those servers with state
under ``data/demo`` (wiped at each start: the demo is throwaway) and the rules of
``examples/rules.toml``, and runs the supervisor ``python -m prod.run`` in the foreground.
Once the first sync has indexed the samples it runs a search with the real CLI, then sends a
new "help" message from the visitor, which the ``support-ack`` rule answers. The daemon serves the
operator console too (port 8080 when free), with an admin user whose generated password the demo
prints once.

Ctrl-C or SIGTERM stops the supervisor (gracefully), then the mail servers; exit code 0.
Missing Dovecot binaries are installed with apt-get when running as root.

``--mail-server-only --listen 0.0.0.0`` runs only the mail servers, reachable on ports 143 (IMAP)
and 587 (SMTP) of every address: the ``mailserver`` container of docker-compose.yml's ``demo``
profile. It sends the visitor's message once the daemon has logged in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the servers are imported when started: aiosmtpd is a demo-only dependency
    from localmail.dovecot import LocalDovecot
    from localmail.smtp_relay import LocalSmtpRelay

REPO = Path(__file__).resolve().parent.parent
SAMPLE_MAIL_DIR = REPO / "examples" / "demo-mail"
RULES_FILE = REPO / "examples" / "rules.toml"
DEFAULT_DATA_DIR = Path("data/demo")

DEMO_USER = "demo@example.test"
DEMO_PASSWORD = "demo-pw"  # noqa: S105  (the demo Dovecot's account, printed to the user)
VISITOR = "visitor@example.org"
VISITOR_PASSWORD = "visitor"  # noqa: S105
ACCOUNTS = {DEMO_USER: DEMO_PASSWORD, VISITOR: VISITOR_PASSWORD}
DOVECOT_PACKAGES = ("dovecot-imapd", "dovecot-lmtpd")
# The operator console's demo user (an admin) and its port, when free.
CONSOLE_USER = "admin"
CONSOLE_PORT = 8080

SEARCH_WORD = "invoice"
TRIGGER_SUBJECT = "Need help with my order"
FIRST_SYNC_TIMEOUT_SECONDS = 60.0
REPLY_TIMEOUT_SECONDS = 45.0
SUPERVISOR_STOP_SECONDS = 30.0
# The compose mail server waits this long after the daemon's first login before the visitor
# writes, so that the first sync (which takes existing mail as history) is over.
COMPOSE_TRIGGER_DELAY_SECONDS = 15.0


def say(text: str) -> None:
    """The demo's own lines, on stderr, apart from the daemon's JSON log on stdout."""
    print(f"==> {text}", file=sys.stderr, flush=True)


class Stop(Exception):
    """SIGTERM or SIGINT arrived: wind everything down."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    # Once: the clean-up that follows must not be interrupted by a second signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


# -- mail servers -------------------------------------------------------------------------------


def ensure_dovecot_installed() -> None:
    """Install Debian's Dovecot packages if the binaries are missing (root only)."""
    if shutil.which("dovecot") and shutil.which("doveadm"):
        return
    if os.geteuid() != 0:
        raise SystemExit(
            "the demo needs Dovecot: run as root, or install it first: "
            f"sudo apt-get install -y {' '.join(DOVECOT_PACKAGES)}"
        )
    say(f"installing {' '.join(DOVECOT_PACKAGES)} with apt-get (once)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DOVECOT_PACKAGES]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    # The Debian package starts a system Dovecot; the demo runs its own on other ports.
    subprocess.run(["service", "dovecot", "stop"], capture_output=True, check=False)


def sample_messages(folder: Path = SAMPLE_MAIL_DIR) -> list[bytes]:
    """The ``*.eml`` files of ``folder`` in name order, with CRLF line ends as IMAP wants."""
    return [
        path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        for path in sorted(folder.glob("*.eml"))
    ]


def visitor_message() -> bytes:
    message = EmailMessage()
    message["From"] = f"Visiting Customer <{VISITOR}>"
    message["To"] = f"Demo <{DEMO_USER}>"
    message["Subject"] = TRIGGER_SUBJECT
    message["Message-ID"] = make_msgid(domain="example.org")
    message.set_content("Hello,\n\nmy order #1234 has not arrived yet. Can you help?\n\nThanks\n")
    return message.as_bytes()


def send_visitor_message(smtp_host: str, smtp_port: int) -> None:
    """The visitor writes to the demo account through the SMTP relay (it delivers over LMTP)."""
    with smtplib.SMTP(smtp_host, smtp_port, timeout=30) as smtp:
        smtp.login(VISITOR, VISITOR_PASSWORD)
        smtp.sendmail(VISITOR, [DEMO_USER], visitor_message())


def start_mail_servers() -> tuple[LocalDovecot, LocalSmtpRelay]:
    """A started LocalDovecot with the demo accounts and samples, and a relay into it."""
    from localmail.dovecot import LocalDovecot
    from localmail.smtp_relay import LocalSmtpRelay

    dovecot = LocalDovecot(ACCOUNTS)
    try:
        dovecot.start()
        for raw in sample_messages():
            dovecot.append(DEMO_USER, "INBOX", raw)
        relay = LocalSmtpRelay(dovecot, ACCOUNTS)
        relay.start()
    except BaseException:
        dovecot.close()
        raise
    return dovecot, relay


# -- the daemon ---------------------------------------------------------------------------------


def console_port() -> int:
    """8080 when it is free on loopback, else any free port."""
    from localmail.dovecot import free_loopback_port

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", CONSOLE_PORT))
        except OSError:
            return free_loopback_port()
    return CONSOLE_PORT


def demo_settings(data_dir: Path, imap_port: int, smtp_port: int, web_port: int) -> dict[str, str]:
    """The environment of the demo's daemon and CLI: every path under ``data_dir``."""
    return {
        "ENV": "demo",
        "LOG_LEVEL": "INFO",
        "LOG_FILE_ENABLED": "true",
        "LOG_FILE_PATH": str(data_dir / "logs" / "app.log"),
        "STATE_DIR": str(data_dir / "state"),
        "CACHE_DIR": str(data_dir / "cache"),
        "WORKERS": "1",
        "SENTRY_DSN": "",
        "EMAIL_IMAP_HOST": "127.0.0.1",
        "EMAIL_IMAP_PORT": str(imap_port),
        "EMAIL_IMAP_SECURITY": "none",
        "EMAIL_SMTP_HOST": "127.0.0.1",
        "EMAIL_SMTP_PORT": str(smtp_port),
        "EMAIL_SMTP_SECURITY": "none",
        "EMAIL_USERNAME": DEMO_USER,
        "EMAIL_PASSWORD": DEMO_PASSWORD,
        "INDEX_DB_URL": f"sqlite:///{data_dir / 'emailops.db'}",
        "RULES_FILE": str(RULES_FILE),
        "POLL_INTERVAL_SECONDS": "5",
        "WEB_PORT": str(web_port),
        "WEB_ADDR": "127.0.0.1",
    }


def reset_data_dir(data_dir: Path) -> None:
    """Empty the demo's data folder: the throwaway Dovecot starts with new UIDVALIDITYs."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    for name in ("logs", "state", "cache"):
        (data_dir / name).mkdir(parents=True)


def wait_for_first_sync(settings: dict[str, str], supervisor: subprocess.Popen[bytes]) -> int:
    """Block until INBOX's first sync is recorded; return how many messages are indexed."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from emailops.store.messages import folder_stats

    account = f"{settings['EMAIL_USERNAME']}@{settings['EMAIL_IMAP_HOST']}"
    engine = create_engine(settings["INDEX_DB_URL"])
    deadline = time.monotonic() + FIRST_SYNC_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            if supervisor.poll() is not None:
                raise SystemExit(f"the daemon exited with code {supervisor.returncode}; see its log above")
            with contextlib.suppress(OperationalError), engine.connect() as conn:
                inbox = [s for s in folder_stats(conn, account) if s.name == "INBOX" and s.last_sync]
                if inbox:
                    return inbox[0].messages
            time.sleep(0.5)
    finally:
        engine.dispose()
    raise SystemExit(f"INBOX was not indexed within {FIRST_SYNC_TIMEOUT_SECONDS:.0f} s; see the log above")


def run_cli(settings: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings}
    return subprocess.run(
        [sys.executable, "-m", "emailops", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )


def wait_for_reply(dovecot: LocalDovecot, supervisor: subprocess.Popen[bytes]) -> str | None:
    """The subject of the first message in the visitor's INBOX, or None after the timeout."""
    deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
    while time.monotonic() < deadline and supervisor.poll() is None:
        with dovecot.imap(VISITOR) as client:
            client.select_folder("INBOX", readonly=True)
            uids = client.search("ALL")
            if uids:
                envelope = client.fetch(uids[:1], ["ENVELOPE"])[uids[0]][b"ENVELOPE"]
                return (envelope.subject or b"").decode(errors="replace")
        time.sleep(1)
    return None


def write_env_file(data_dir: Path, settings: dict[str, str]) -> Path:
    path = data_dir / "demo.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    return path


def stop_supervisor(supervisor: subprocess.Popen[bytes]) -> int:
    if supervisor.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=SUPERVISOR_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
    return supervisor.returncode


def run_demo(data_dir: Path) -> int:
    ensure_dovecot_installed()
    data_dir = data_dir.resolve()
    reset_data_dir(data_dir)
    dovecot, relay = start_mail_servers()
    supervisor: subprocess.Popen[bytes] | None = None
    try:
        settings = demo_settings(data_dir, dovecot.imap_port, relay.port, console_port())
        env_file = write_env_file(data_dir, settings)
        say(
            f"throwaway Dovecot on 127.0.0.1:{dovecot.imap_port} (IMAP), "
            f"SMTP relay on 127.0.0.1:{relay.port}; "
            f"account {DEMO_USER} / {DEMO_PASSWORD} with {len(sample_messages())} sample messages"
        )
        say(f"starting the daemon (python -m prod.run); state in {data_dir}, rules from {RULES_FILE}")
        started = time.monotonic()
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "prod.run"], env={**os.environ, **settings}, cwd=REPO
        )
        # Meanwhile, a console user: its generated password is printed by the command, once.
        added = run_cli(settings, "users", "add", CONSOLE_USER, "--role", "admin")
        if added.returncode == 0:
            say(
                f"operator console: http://127.0.0.1:{settings['WEB_PORT']}/ user {CONSOLE_USER}, "
                f"password {added.stdout.strip()} (shown this once)"
            )
        else:
            say(f"no console user: {added.stderr.strip()}")
        indexed = wait_for_first_sync(settings, supervisor)
        say(f"indexed {indexed} messages in {time.monotonic() - started:.1f} s")

        search = run_cli(settings, "search", "--json", SEARCH_WORD)
        hits = json.loads(search.stdout) if search.returncode == 0 else []
        for hit in hits:
            say(f"search {SEARCH_WORD!r}: {hit['folder']}:{hit['uid']}  {hit['from']}  {hit['subject']}")
        if not hits:
            say(f"search {SEARCH_WORD!r} found nothing: {search.stderr.strip()}")

        send_visitor_message(relay.host, relay.port)
        say(f"{VISITOR} wrote {TRIGGER_SUBJECT!r} to {DEMO_USER}; the support-ack rule answers it")
        subject = wait_for_reply(dovecot, supervisor)
        if subject is not None:
            say(f"automatic reply delivered to {VISITOR}'s INBOX: {subject!r}")
        else:
            say(f"no automatic reply reached {VISITOR} within {REPLY_TIMEOUT_SECONDS:.0f} s")

        say("the daemon keeps running; in another terminal try:")
        say(f"  env $(cat {env_file}) python -m emailops search zürich")
        say(f"  env $(cat {env_file}) python -m emailops stats")
        say(f"  env $(cat {env_file}) python -m prod.healthcheck")
        say(f'  grep \'"component":"index"\' {settings["LOG_FILE_PATH"]}')
        say("Ctrl-C stops the daemon and the mail servers")
        supervisor.wait()
        say(f"the daemon exited with code {supervisor.returncode}")
        return 0 if supervisor.returncode == 0 else 1
    except (Stop, KeyboardInterrupt):
        say("stopping")
        code = stop_supervisor(supervisor) if supervisor is not None else 0
        say(f"the daemon stopped with exit code {code}")
        return 0 if code == 0 else 1
    finally:
        if supervisor is not None:
            stop_supervisor(supervisor)
        relay.close()
        dovecot.close()


# -- the compose demo's mail server --------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _forward(listen_host: str, listen_port: int, target_port: int) -> asyncio.Server:
    """Accept on ``listen_host:listen_port`` and splice each connection to ``127.0.0.1:target_port``
    (the local servers listen on loopback only)."""

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))

    return await asyncio.start_server(handle, listen_host, listen_port)


def _send_when_daemon_logged_in(dovecot: LocalDovecot, relay: LocalSmtpRelay, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if dovecot.imap_process_ids(DEMO_USER):
            if not stop.wait(COMPOSE_TRIGGER_DELAY_SECONDS):
                send_visitor_message(relay.host, relay.port)
                say(f"{VISITOR} wrote {TRIGGER_SUBJECT!r} to {DEMO_USER}")
            return


def run_mail_server(listen_host: str, imap_port: int, smtp_port: int) -> int:
    ensure_dovecot_installed()
    dovecot, relay = start_mail_servers()
    stop = threading.Event()
    say(
        f"demo mail server: IMAP {listen_host}:{imap_port}, SMTP {listen_host}:{smtp_port}, "
        f"accounts {DEMO_USER} / {DEMO_PASSWORD} and {VISITOR} / {VISITOR_PASSWORD}"
    )

    async def serve() -> None:
        servers = [
            await _forward(listen_host, imap_port, dovecot.imap_port),
            await _forward(listen_host, smtp_port, relay.port),
        ]
        try:
            await asyncio.Event().wait()
        finally:
            for server in servers:
                server.close()

    trigger = threading.Thread(target=_send_when_daemon_logged_in, args=(dovecot, relay, stop), daemon=True)
    trigger.start()
    try:
        asyncio.run(serve())
    except (Stop, KeyboardInterrupt):
        say("stopping the demo mail server")
    finally:
        stop.set()
        relay.close()
        dovecot.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localmail.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="demo state (default: %(default)s)"
    )
    parser.add_argument(
        "--mail-server-only", action="store_true", help="run only the mail servers (compose demo)"
    )
    parser.add_argument("--listen", default="127.0.0.1", help="address of the mail-server-only ports")
    parser.add_argument("--imap-port", type=int, default=143, help="mail-server-only IMAP port (default 143)")
    parser.add_argument("--smtp-port", type=int, default=587, help="mail-server-only SMTP port (default 587)")
    args = parser.parse_args(argv)
    # aiosmtpd warns once per session that AUTH is allowed without TLS: on loopback, by design.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _raise_stop)
    if args.mail_server_only:
        return run_mail_server(args.listen, args.imap_port, args.smtp_port)
    return run_demo(args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
