"""OAuth2 sign-in end to end: Dovecot with ``passdb { driver = oauth2 }`` checking tokens at the
loopback authorization server's introspection endpoint, the SMTP relay accepting XOAUTH2 with
the same tokens, and emailops as operators run it (``python -m emailops``, ``python -m prod.run``)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from emailops.accounts.store import import_accounts
from emailops.audit import Actor
from emailops.auth.crypto import SecretCipher, TokenCipher
from emailops.auth.sasl import oauthbearer, xoauth2
from emailops.auth.token_endpoint import TokenResponse
from emailops.auth.token_source import TokenSource
from emailops.config import ServerConfig, TlsSecurity
from emailops.imap.connection import connect
from emailops.imap.errors import ImapAuthError, ImapTransientError
from emailops.imap.sync import FolderSync
from emailops.imap.watcher import OAUTH2_AUTH_RETRY_MAX_SECONDS, FolderWatcher
from emailops.replies.smtp_sender import SmtpAuthError, SmtpSender, TransientSendError
from emailops.store.schema import folders, messages, oauth2_tokens
from localmail.dovecot import LocalDovecot
from localmail.oauth2_server import LocalOAuth2Server
from localmail.smtp_relay import LocalSmtpRelay
from tests.conftest import MAIL_USERS
from tests.index_helpers import (
    ALICE,
    daemon_env,
    first_synced,
    imap_config,
    index_engine,
    message,
    rows,
    sync_config,
)
from tests.oauth2_helpers import (
    APP_CLIENT_ID,
    CLIENT_ID,
    TOKEN_KEY,
    Clock,
    auth_server,
    bearer_user,
    delegated_client,
    dovecot_oauth2,
    oauth2_account,
    oauth2_config,
    oauth2_env,
)
from tests.test_daemon_e2e import wait_for
from tests.test_sentry import _SentryEndpoint, endpoint

__all__ = ["auth_server", "dovecot_oauth2", "endpoint"]

REPO = Path(__file__).resolve().parents[1]
RULES = (
    '[[rules]]\nname = "ack"\n[rules.match]\nsubject = "help"\n[rules.reply]\ntemplate = "Got {subject}"\n'
)


def emailops(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailops", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def secret_spellings(server: LocalOAuth2Server) -> set[str]:
    """Every token the server issued, its clients' secrets and the key, raw and in SASL base64
    (for each mailbox)."""
    values = {TOKEN_KEY, *filter(None, server.clients.values()), *server.issued}
    for token in server.issued:
        for user in MAIL_USERS:
            for sasl in (xoauth2(user, token), oauthbearer(user, token), token):
                values.add(base64.b64encode(sasl.encode()).decode())
    return values


def assert_no_secret(texts: list[str], server: LocalOAuth2Server) -> None:
    assert server.issued, "no token was issued: nothing was checked"
    leaked = sorted(value for value in secret_spellings(server) if any(value in text for text in texts))
    assert leaked == []


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_sync_once_signs_in_with_the_mechanism_the_server_offers(
    auth_server: LocalOAuth2Server, tmp_path: Path, mechanism: str
) -> None:
    with LocalDovecot(
        MAIL_USERS, oauth2_introspection_url=auth_server.introspection_url, oauth2_mechanisms=[mechanism]
    ) as dovecot:
        dovecot.deliver(ALICE, message(1))
        dovecot.deliver(ALICE, message(2))
        seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
        env = oauth2_env(dovecot, auth_server, tmp_path, EMAIL_OAUTH2_REFRESH_TOKEN=seed, LOG_LEVEL="DEBUG")
        result = emailops(env, "sync", "--once", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)[0]["new"] == 2
        assert f"method={mechanism.upper()}" in dovecot.log_text()
        assert auth_server.count("token:refresh_token") == 1
        assert_no_secret([result.stdout, result.stderr], auth_server)


def test_client_credentials_flow_syncs(
    auth_server: LocalOAuth2Server, dovecot_oauth2: LocalDovecot, tmp_path: Path
) -> None:
    dovecot_oauth2.deliver(ALICE, message(1))
    env = oauth2_env(
        dovecot_oauth2,
        auth_server,
        tmp_path,
        EMAIL_OAUTH2_FLOW="client_credentials",
        EMAIL_OAUTH2_CLIENT_ID=APP_CLIENT_ID,
    )
    result = emailops(env, "sync", "--once", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["new"] == 1
    assert auth_server.count("token:client_credentials") == 1
    assert auth_server.count("token:refresh_token") == 0


def test_auth_login_status_logout_end_to_end(
    auth_server: LocalOAuth2Server, dovecot_oauth2: LocalDovecot, tmp_path: Path
) -> None:
    env = oauth2_env(dovecot_oauth2, auth_server, tmp_path, LOG_LEVEL="DEBUG")
    before = emailops(env, "auth", "status", "--json")
    assert before.returncode == 1 and json.loads(before.stdout)["signed_in"] is False

    login = subprocess.Popen(
        [sys.executable, "-m", "emailops", "auth", "login", "--json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert login.stdout is not None
        prompt = json.loads(login.stdout.readline())
        assert prompt["verification_uri"].startswith(auth_server.base_url)
        # The person opens the URL and enters the code.
        auth_server.approve(prompt["user_code"], ALICE)
        out, err = login.communicate(timeout=30)
    finally:
        if login.poll() is None:
            login.kill()
    assert login.returncode == 0, err
    done = json.loads(out)
    assert done["signed_in"] is True and done["access_expires_at"]
    assert auth_server.count("token:urn:ietf:params:oauth:grant-type:device_code") >= 1

    status = emailops(env, "auth", "status", "--json")
    assert status.returncode == 0
    shown = json.loads(status.stdout)
    assert shown["signed_in"] is True and shown["flow"] == "refresh_token" and shown["last_refresh"]
    assert shown["provider"] == "custom" and shown["access_expires_at"] > shown["last_refresh"]
    assert shown["account"] == f"{ALICE}@{dovecot_oauth2.host}" and shown["last_error"] is None

    dovecot_oauth2.deliver(ALICE, message(1))
    synced = emailops(env, "sync", "--once", "--json")
    assert synced.returncode == 0, synced.stderr
    assert json.loads(synced.stdout)[0]["new"] == 1
    assert auth_server.count("token:refresh_token") == 0  # the login's access token was used

    logout = emailops(env, "auth", "logout")
    assert logout.returncode == 0 and "removed" in logout.stdout
    after = emailops(env, "auth", "status", "--json")
    assert after.returncode == 1 and json.loads(after.stdout)["signed_in"] is False
    refused = emailops(env, "sync", "--once")
    assert refused.returncode == 1 and "run `emailops auth login`" in refused.stderr
    assert_no_secret(
        [
            prompt["user_code"],
            out,
            err,
            status.stdout,
            status.stderr,
            synced.stdout,
            synced.stderr,
            refused.stderr,
        ],
        auth_server,
    )


def test_smtp_refused_token_is_an_auth_error_naming_the_fix(
    auth_server: LocalOAuth2Server, tmp_path: Path
) -> None:
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    tokens = TokenSource(
        index_engine(f"sqlite:///{tmp_path / 'index.db'}"),
        oauth2_config(auth_server, initial_refresh_token=seed),
    )
    with LocalSmtpRelay(None, {}, bearer_user=bearer_user(auth_server)) as relay:
        config = ServerConfig(relay.host, relay.port, ALICE, "", TlsSecurity.NONE, tokens=tokens)
        with SmtpSender(config) as sender:
            sender.send(envelope_from=ALICE, recipient="bob@example.org", raw=message(1))
        assert relay.accepted[0].auth_login == ALICE
        # Access tokens revoked early and the refresh token too: one forced refresh, then the fix.
        auth_server.revoke_access_tokens()
        auth_server.revoke_refresh_tokens()
        with SmtpSender(config) as sender, pytest.raises(SmtpAuthError) as refused:
            sender.send(envelope_from=ALICE, recipient="bob@example.org", raw=message(2))
    assert auth_server.count("token:refresh_token") == 1  # the fresh token was not refreshed again
    assert "freshly issued OAuth2 access token" in str(refused.value)


def test_a_token_refused_before_it_expires_is_replaced_once_and_an_outage_is_not_a_refusal(
    auth_server: LocalOAuth2Server, dovecot_oauth2: LocalDovecot, tmp_path: Path
) -> None:
    """The mail servers stop accepting an access token that has not expired (revoked early): IMAP
    and SMTP each sign in after exactly one refresh. A token endpoint that cannot answer then is a
    transient failure (retried soon), not a refusal that needs `emailops auth login`."""
    clock = Clock()  # moved past FRESH_TOKEN_AGE: a refused token older than that is refreshed
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    tokens = TokenSource(
        index_engine(f"sqlite:///{tmp_path / 'index.db'}"),
        oauth2_config(auth_server, initial_refresh_token=seed),
        clock=clock,
    )
    imap = imap_config(dovecot_oauth2, password="", tokens=tokens)
    connect(imap).logout()
    assert auth_server.count("token:refresh_token") == 1

    def revoke_early() -> str:
        """Revoke the current access token at the servers; it is not due for a refresh."""
        current = tokens.access_token()
        auth_server.revoke_access_tokens()
        clock.advance(120)
        assert tokens.access_token() == current
        return current

    refused = revoke_early()
    client = connect(imap)
    assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 0
    client.logout()
    assert auth_server.count("token:refresh_token") == 2
    assert tokens.access_token() != refused

    with LocalSmtpRelay(None, {}, bearer_user=bearer_user(auth_server)) as relay:
        smtp = ServerConfig(relay.host, relay.port, ALICE, "", TlsSecurity.NONE, tokens=tokens)
        revoke_early()
        with SmtpSender(smtp) as sender:
            sender.send(envelope_from=ALICE, recipient="bob@example.org", raw=message(1))
        assert relay.accepted[0].auth_login == ALICE
        assert auth_server.count("token:refresh_token") == 3

        revoke_early()
        auth_server.outage_status = 503
        with pytest.raises(ImapTransientError, match=r"no OAuth2 access token.*HTTP 503"):
            connect(imap)
        with SmtpSender(smtp) as sender, pytest.raises(TransientSendError) as smtp_outage:
            sender.send(envelope_from=ALICE, recipient="bob@example.org", raw=message(2))
        assert not isinstance(smtp_outage.value, SmtpAuthError)
        assert "no OAuth2 access token" in str(smtp_outage.value)
    status = tokens.status()
    assert status is not None and status.signed_in and status.last_error_kind == "unavailable"
    # One request was answered 503; SMTP, within the token source's backoff, made none.
    assert auth_server.count("token:refresh_token") == 4


@pytest.fixture
def relay_xoauth2(dovecot_oauth2: LocalDovecot, auth_server: LocalOAuth2Server) -> Iterator[LocalSmtpRelay]:
    """An SMTP relay that takes only XOAUTH2 with the server's tokens (like Microsoft 365)."""
    with LocalSmtpRelay(
        dovecot_oauth2,
        {},
        bearer_user=bearer_user(auth_server),
        auth_exclude=("OAUTHBEARER", "PLAIN", "LOGIN"),
    ) as relay:
        yield relay


class Daemon:
    def __init__(self, env: dict[str, str], data: Path) -> None:
        self.env = env
        self.data = data
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.runs += 1
        with (
            (self.data / f"stdout-{self.runs}.log").open("w") as out,
            (self.data / f"stderr-{self.runs}.log").open("w") as err,
        ):
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prod.run"], env=self.env, cwd=REPO, stdout=out, stderr=err
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def output(self) -> list[str]:
        files = [*self.data.glob("stdout-*.log"), *self.data.glob("stderr-*.log"), *self.data.glob("logs/*")]
        return [path.read_text(errors="replace") for path in files if path.is_file()]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for daemon in made:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def test_daemon_indexes_and_replies_across_expiry_rotation_and_restart_without_leaking(
    auth_server: LocalOAuth2Server,
    dovecot_oauth2: LocalDovecot,
    relay_xoauth2: LocalSmtpRelay,
    daemon_factory: list[Daemon],
    tmp_path: Path,
) -> None:
    auth_server.access_token_seconds = 16  # due 4 s before it expires
    (tmp_path / "rules.toml").write_text(RULES)
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    env = oauth2_env(
        dovecot_oauth2,
        auth_server,
        tmp_path,
        EMAIL_OAUTH2_REFRESH_TOKEN=seed,
        EMAIL_SMTP_PORT=str(relay_xoauth2.port),
        WORKERS="2",
        LOG_LEVEL="DEBUG",
        LOG_FILE_ENABLED="true",
        SHUTDOWN_TIMEOUT_SECONDS="10",
    )
    engine = index_engine(env["INDEX_DB_URL"])

    def indexed() -> int:
        return int(rows(engine, "SELECT count(*) FROM messages")[0][0])

    daemon = Daemon(env, tmp_path)
    daemon_factory.append(daemon)
    daemon.start()
    # Signed in and synced once (mail from before the first sync is never answered).
    wait_for(
        lambda: bool(rows(engine, "SELECT last_sync_at FROM folders WHERE last_sync_at IS NOT NULL")),
        30,
        "first sync",
    )
    assert auth_server.count("token:refresh_token") == 1
    first_access = [token for token in auth_server.issued if token.startswith("eo-at-")][-1]
    dovecot_oauth2.deliver(ALICE, message(1, subject="help please"))
    wait_for(lambda: len(relay_xoauth2.accepted) == 1, 30, "reply sent with XOAUTH2")
    assert relay_xoauth2.accepted[0].auth_login == ALICE
    assert "method=XOAUTH2" not in dovecot_oauth2.log_text()  # IMAP chose OAUTHBEARER, offered too
    assert "method=OAUTHBEARER" in dovecot_oauth2.log_text()
    assert auth_server.count("token:refresh_token") == 1  # IMAP and SMTP, two workers: one token

    # The access token expires while the daemon IDLEs; the server then ends the session with a
    # BYE (as Exchange Online does when a session's token expires): the watcher signs in again
    # with a refreshed token and the next message is indexed.
    wait_for(lambda: not auth_server.introspect(first_access)["active"], 30, "first access token expired")
    assert dovecot_oauth2.kill_imap_connections(ALICE, signal.SIGTERM) >= 1
    dovecot_oauth2.deliver(ALICE, message(2))
    wait_for(lambda: indexed() == 2, 30, "message 2 indexed after the expiry")
    assert auth_server.count("token:refresh_token") == 2
    # Rotated: the seed is refused from now on, and the stored refresh token is the newest one.
    assert not auth_server.refresh_token_valid(seed)
    newest_refresh = [token for token in auth_server.issued if token.startswith("eo-rt-")][-1]
    assert auth_server.refresh_token_valid(newest_refresh)

    # A restarted daemon (same environment, seed still set) signs in with the stored new token.
    daemon.stop()
    last_access = [token for token in auth_server.issued if token.startswith("eo-at-")][-1]
    wait_for(
        lambda: not auth_server.introspect(last_access)["active"], 30, "access token expired while stopped"
    )
    daemon.start()
    dovecot_oauth2.deliver(ALICE, message(3))
    wait_for(lambda: indexed() == 3, 30, "message 3 indexed after the restart")
    assert auth_server.count("token:refresh_token") == 3
    assert not auth_server.refresh_token_valid(newest_refresh)
    daemon.stop()

    texts = daemon.output()
    joined = "\n".join(texts)
    assert '"logger":"imapclient' in joined and '"level":"DEBUG"' in joined  # DEBUG was on
    assert '"level":"ERROR"' not in joined
    assert_no_secret(texts, auth_server)
    # The database and a copy made by `emailops backup` hold the tokens, encrypted only.
    backup = tmp_path / "backup.db"
    copied = emailops(env, "backup", str(backup))
    assert copied.returncode == 0, copied.stderr
    stored = [path.read_bytes().decode("latin-1") for path in [*tmp_path.glob("emailops.db*"), backup]]
    with_refresh_token = "SELECT count(*) FROM oauth2_tokens WHERE refresh_token IS NOT NULL"
    assert rows(engine, with_refresh_token) == [(1,)]
    assert rows(index_engine(f"sqlite:///{backup}"), with_refresh_token) == [(1,)]
    assert_no_secret(stored, auth_server)


def test_daemon_signs_in_with_xoauth2_when_the_server_offers_only_that(
    auth_server: LocalOAuth2Server, daemon_factory: list[Daemon], tmp_path: Path
) -> None:
    with LocalDovecot(
        MAIL_USERS, oauth2_introspection_url=auth_server.introspection_url, oauth2_mechanisms=["xoauth2"]
    ) as dovecot:
        env = oauth2_env(
            dovecot,
            auth_server,
            tmp_path,
            EMAIL_OAUTH2_REFRESH_TOKEN=auth_server.issue_refresh_token(ALICE, CLIENT_ID),
        )
        engine = index_engine(env["INDEX_DB_URL"])
        daemon = Daemon(env, tmp_path)
        daemon_factory.append(daemon)
        daemon.start()
        wait_for(
            lambda: bool(rows(engine, "SELECT 1 FROM folders WHERE last_sync_at IS NOT NULL")),
            30,
            "first sync",
        )
        dovecot.deliver(ALICE, message(1))
        wait_for(lambda: rows(engine, "SELECT count(*) FROM messages") == [(1,)], 30, "message indexed")
        daemon.stop()
        assert "method=XOAUTH2" in dovecot.log_text() and "method=OAUTHBEARER" not in dovecot.log_text()


def test_daemon_with_revoked_refresh_token_logs_one_error_and_no_storm(
    auth_server: LocalOAuth2Server, dovecot_oauth2: LocalDovecot, daemon_factory: list[Daemon], tmp_path: Path
) -> None:
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    auth_server.revoke_refresh_tokens()
    env = oauth2_env(
        dovecot_oauth2,
        auth_server,
        tmp_path,
        EMAIL_OAUTH2_REFRESH_TOKEN=seed,
        WORKERS="2",
        HEALTH_MAX_SYNC_AGE_SECONDS="4",
        POLL_INTERVAL_SECONDS="1",
    )
    daemon = Daemon(env, tmp_path)
    daemon_factory.append(daemon)
    daemon.start()

    def health(*args: str) -> dict[str, object]:
        answer = subprocess.run(
            [sys.executable, "-m", "prod.healthcheck", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        return json.loads(answer.stdout) if answer.stdout.strip() else {}

    def errors() -> list[dict[str, object]]:
        lines = (tmp_path / "stdout-1.log").read_text().splitlines()
        return [json.loads(line) for line in lines if '"level":"ERROR"' in line]

    wait_for(lambda: bool(errors()), 30, "an ERROR about the sign-in")
    assert [entry["component"] for entry in errors()] == ["imap"], errors()
    error = errors()[0]
    assert error["error_type"] == "ImapAuthError"
    assert "invalid_grant" in str(error["error"]) and "run `emailops auth login`" in str(error["error"])
    # The other worker and later retries within the backoff make no token request.
    status = emailops(env, "auth", "status", "--json")
    shown = json.loads(status.stdout)
    assert "invalid_grant" in shown["last_error"] and shown["next_token_request_after"]
    assert auth_server.count("token") == 1
    assert len(errors()) == 1

    # The account is auth_failed, which a restart would not fix: the container stays healthy past
    # HEALTH_MAX_SYNC_AGE_SECONDS, and `--verbose` says what to do (alert EmailOpsAccountSignInRefused).
    def refused() -> list[dict[str, object]]:
        detail = health("--verbose").get("detail", {})
        accounts = detail.get("accounts", []) if isinstance(detail, dict) else []
        return [row for row in accounts if row["state"] == "auth_failed"]

    def uptime() -> float:
        detail = health("--verbose").get("detail", {})
        workers = detail.get("workers", []) if isinstance(detail, dict) else []
        return min((float(worker.get("uptime_seconds") or 0) for worker in workers), default=0.0)

    wait_for(lambda: bool(refused()), 60, "the account auth_failed")
    wait_for(lambda: uptime() > 4 + 1, 60, "the workers up for longer than the sync age limit")
    verbose = health("--verbose")
    assert verbose["ok"] is True
    assert "emailops auth login" in str(refused()[0]["error"])
    assert auth_server.count("token") == 1  # still none after the first, well within its minute
    daemon.stop()
    assert_no_secret([*daemon.output(), status.stdout, json.dumps(verbose)], auth_server)


def test_sentry_events_of_a_refused_sign_in_hold_no_token(
    auth_server: LocalOAuth2Server,
    dovecot_oauth2: LocalDovecot,
    daemon_factory: list[Daemon],
    endpoint: _SentryEndpoint,
    tmp_path: Path,
) -> None:
    """Sentry is an output too: the event of a refused sign-in, with the log lines before it as
    breadcrumbs, carries no token, SASL string, client secret or key, at LOG_LEVEL=DEBUG."""
    auth_server.access_token_seconds = 8
    env = oauth2_env(
        dovecot_oauth2,
        auth_server,
        tmp_path,
        EMAIL_OAUTH2_REFRESH_TOKEN=auth_server.issue_refresh_token(ALICE, CLIENT_ID),
        LOG_LEVEL="DEBUG",
        SENTRY_DSN=endpoint.dsn,
    )
    engine = index_engine(env["INDEX_DB_URL"])
    daemon = Daemon(env, tmp_path)
    daemon_factory.append(daemon)
    daemon.start()
    wait_for(lambda: bool(rows(engine, "SELECT 1 FROM folders WHERE last_sync_at IS NOT NULL")), 30, "sync")
    access = [token for token in auth_server.issued if token.startswith("eo-at-")][-1]
    # The refresh token is revoked and the access token expires: the next sign-in is refused.
    auth_server.revoke_refresh_tokens()
    wait_for(lambda: not auth_server.introspect(access)["active"], 30, "access token expired")
    assert dovecot_oauth2.kill_imap_connections(ALICE, signal.SIGTERM) >= 1

    def refused() -> list[dict[str, object]]:
        return [event for event in endpoint.events() if "sign-in with OAuth2 refused" in json.dumps(event)]

    wait_for(lambda: bool(refused()), 30, "the refused sign-in reached Sentry")
    daemon.stop()
    event = refused()[0]
    crumbs = [str(crumb.get("message")) for crumb in event["breadcrumbs"]["values"]]  # type: ignore[index]
    for logged in ("oauth2 access token refreshed", "oauth2 token request failed"):
        assert any(crumb.startswith(logged) for crumb in crumbs), crumbs
    assert_no_secret([raw.decode("utf-8", "replace") for raw in endpoint.raw_envelopes], auth_server)


def test_refused_sign_in_is_retried_within_minutes_and_resumes_after_login(
    auth_server: LocalOAuth2Server, dovecot_oauth2: LocalDovecot, tmp_path: Path
) -> None:
    engine = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    auth_server.revoke_refresh_tokens()
    tokens = TokenSource(engine, oauth2_config(auth_server, initial_refresh_token=seed))
    config = sync_config()
    now = [0.0]
    watcher = FolderWatcher(
        imap_config(dovecot_oauth2, password="", tokens=tokens),
        config,
        FolderSync(engine, config, "INBOX"),
        monotonic=lambda: now[0],
        sleep=lambda _seconds: None,
    )
    with capture_logs() as logs:
        for _ in range(8):
            watcher.step(0)
            assert not watcher.connected
            assert watcher.next_connect_at - now[0] <= OAUTH2_AUTH_RETRY_MAX_SECONDS + 1e-6
            now[0] = watcher.next_connect_at
    refusals = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(refusals) == 8 and refusals[0]["error_type"] == "ImapAuthError"
    assert "run `emailops auth login`" in refusals[0]["error"]
    assert auth_server.count("token") == 1  # the token source's backoff, in real time

    # The operator signs in again: the next attempt signs in and syncs.
    tokens.store_login(
        TokenResponse(
            access_token=auth_server.issue_access_token(ALICE, CLIENT_ID),
            expires_in=3600,
            refresh_token=auth_server.issue_refresh_token(ALICE, CLIENT_ID),
        )
    )
    dovecot_oauth2.deliver(ALICE, message(1))
    watcher.step(0)
    assert watcher.connected and watcher.failures == 0
    watcher.close()


@pytest.mark.postgres
def test_two_instances_sharing_postgresql_refresh_once_when_all_reconnect(
    auth_server: LocalOAuth2Server,
    dovecot_oauth2: LocalDovecot,
    daemon_factory: list[Daemon],
    pg_url: str,
    tmp_path: Path,
) -> None:
    """Two daemons (as two containers) with two workers each, one folder per worker: when the server
    restarts after the access token expired, every watcher signs in again at about the same moment."""
    folders = ["INBOX", "A", "B", "C"]
    for folder in folders[1:]:
        dovecot_oauth2.create_folder(ALICE, folder)
    auth_server.access_token_seconds = 8
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    engine = index_engine(pg_url)
    daemons = []
    for n in (1, 2):
        data = tmp_path / f"instance-{n}"
        data.mkdir()
        env = oauth2_env(
            dovecot_oauth2,
            auth_server,
            data,
            EMAIL_OAUTH2_REFRESH_TOKEN=seed,
            INDEX_DB_URL=pg_url,
            WORKERS="2",
            EMAIL_FOLDERS=",".join(folders),
        )
        daemons.append(Daemon(env, data))
    daemon_factory.extend(daemons)
    for daemon in daemons:
        daemon.start()
    synced = "SELECT count(*) FROM folders WHERE last_sync_at IS NOT NULL"
    wait_for(lambda: rows(engine, synced) == [(4,)], 60, "every folder synced")
    assert auth_server.count("token:refresh_token") == 1
    current = [token for token in auth_server.issued if token.startswith("eo-at-")][-1]
    wait_for(lambda: not auth_server.introspect(current)["active"], 30, "access token expired")

    auth_server.token_delay_seconds = 1.0  # a slow endpoint: the other sign-ins arrive meanwhile
    auth_server.access_token_seconds = 3600  # the next token is not due again during the test
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE folders SET last_sync_at = NULL")
    dovecot_oauth2.restart()
    wait_for(lambda: rows(engine, synced) == [(4,)], 60, "every folder synced again")
    assert auth_server.count("token:refresh_token") == 2
    for daemon in daemons:
        daemon.stop()


def test_a_server_without_oauth2_is_an_auth_error_that_says_so(
    auth_server: LocalOAuth2Server, dovecot: LocalDovecot, tmp_path: Path
) -> None:
    tokens = TokenSource(
        index_engine(f"sqlite:///{tmp_path / 'index.db'}"),
        oauth2_config(auth_server, initial_refresh_token=auth_server.issue_refresh_token(ALICE, CLIENT_ID)),
    )
    with pytest.raises(ImapAuthError, match=r"offers no OAuth2 sign-in \(AUTH LOGIN PLAIN\)"):
        connect(imap_config(dovecot, password="", tokens=tokens))
    assert auth_server.count("token") == 0


def test_two_accounts_of_the_index_refresh_each_on_its_own_and_a_revoked_grant_stops_only_its_own(
    auth_server: LocalOAuth2Server,
    dovecot_oauth2: LocalDovecot,
    relay_xoauth2: LocalSmtpRelay,
    daemon_factory: list[Daemon],
    tmp_path: Path,
) -> None:
    """Two workers serve alice and bob, accounts of the index (no EMAIL_*) signing in with OAuth2
    as two clients of the same server, tokens valid for 10 s. Each account's token is refreshed
    when its own watcher signs in again after its token expired, several times, one account at a
    time: the other's token row and token requests do not move, and each row holds its own
    mailbox's tokens. Then bob's grant is revoked: bob is auth_failed, alice goes on."""
    auth_server.access_token_seconds = 10
    (tmp_path / "rules.toml").write_text(RULES)
    no_default = {
        key: value
        for key, value in daemon_env(dovecot_oauth2, tmp_path).items()
        if not key.startswith("EMAIL_")
    }
    env = no_default | {
        "SECRETS_KEY": TOKEN_KEY,
        "WORKERS": "2",
        "LOG_LEVEL": "DEBUG",
        "LOG_FILE_ENABLED": "true",
        "SHUTDOWN_TIMEOUT_SECONDS": "10",
    }
    users = sorted(MAIL_USERS)  # alice (client 0), bob (client 1)
    accounts = [
        oauth2_account(user.split("@")[0], user, auth_server, dovecot_oauth2, relay_xoauth2.port, client=n)
        for n, user in enumerate(users)
    ]
    engine = index_engine(env["INDEX_DB_URL"])
    import_accounts(engine, accounts, SecretCipher([TOKEN_KEY]), actor=Actor(name="cli:test", role="admin"))
    cipher = TokenCipher([TOKEN_KEY])

    def token_requests(n: int) -> int:
        return auth_server.count(f"token:refresh_token:{delegated_client(n)[0]}")

    def token_row(n: int) -> Any:
        with engine.connect() as conn:
            query = select(oauth2_tokens).where(oauth2_tokens.c.account == accounts[n].index_key)
            return conn.execute(query).one()

    def access_token(n: int) -> str:
        return cipher.decrypt(token_row(n).access_token)

    def indexed(n: int) -> int:
        query = (
            select(func.count())
            .select_from(messages.join(folders, folders.c.id == messages.c.folder_id))
            .where(folders.c.account == accounts[n].index_key)
        )
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def replies(n: int) -> list[str | None]:
        """The sign-in names of the replies sent from account ``n``."""
        return [sent.auth_login for sent in relay_xoauth2.accepted if sent.mail_from == users[n]]

    def states() -> dict[str, str]:
        listed = emailops(env, "accounts", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        return {account["name"]: account["state"] for account in json.loads(listed.stdout)}

    def settled() -> bool:
        """Both folders synced, one per worker (no lease moves from now on: a worker may have held
        both for a while, and its sign-in for the folder it gave up refreshed that account's
        token again), each account signed in."""
        with engine.connect() as conn:
            owners = conn.execute(select(folders.c.lease_owner)).scalars().all()
        signed_in = dovecot_oauth2.logged_in_by_user()
        held = set(owners) - {None}
        return first_synced(env["INDEX_DB_URL"], 2) and len(held) == 2 and len(signed_in) == 2

    def sign_in_again(n: int) -> None:
        """Account ``n``'s access token expires and the server ends its sessions: its watcher
        signs in again (the other account's stay signed in, with a token expired too)."""
        expired = access_token(n)
        wait_for(lambda: not auth_server.introspect(expired)["active"], 30, f"{users[n]}'s token expired")
        assert dovecot_oauth2.kill_imap_connections(users[n], signal.SIGTERM) >= 1

    def answered(n: int, number: int, mails: int) -> None:
        """Message ``number``, the ``mails``-th to account ``n``, is indexed and answered."""
        dovecot_oauth2.deliver(users[n], message(number, subject="help please"))
        wait_for(lambda: indexed(n) == mails, 30, f"{users[n]}'s message {number} indexed")
        wait_for(lambda: len(replies(n)) == mails, 30, f"{users[n]}'s reply to message {number}")

    daemon = Daemon(env, tmp_path)
    daemon_factory.append(daemon)
    daemon.start()
    wait_for(settled, 60, "both accounts synced, a folder for each worker")
    started = [token_requests(0), token_requests(1)]
    assert min(started) >= 1

    for number in range(1, 7):  # alice, bob, alice, bob, alice, bob
        n, other = (number - 1) % 2, number % 2
        requests, others_row = [token_requests(0), token_requests(1)], token_row(other)
        sign_in_again(n)
        answered(n, number, (number + 1) // 2)
        requests[n] += 1
        assert [token_requests(0), token_requests(1)] == requests
        assert token_row(other) == others_row
        shown = auth_server.introspect(access_token(n))
        assert (shown["username"], shown["client_id"]) == (users[n], delegated_client(n)[0])
    assert [token_requests(0), token_requests(1)] == [started[0] + 3, started[1] + 3]
    assert replies(0) == [users[0]] * 3 and replies(1) == [users[1]] * 3  # SMTP with each one's token

    # Bob's grant is revoked: his next sign-in is refused once (no storm), alice's are not.
    auth_server.revoke_refresh_tokens(delegated_client(1)[0])
    sign_in_again(1)
    wait_for(lambda: states()["bob"] == "auth_failed", 60, "bob auth_failed")
    assert states()["alice"] == "ok"
    assert token_row(1).last_error_kind == "refused" and token_requests(1) == started[1] + 4

    sign_in_again(0)
    answered(0, 7, 4)
    assert [token_requests(0), token_requests(1)] == [started[0] + 4, started[1] + 4]
    assert token_row(0).last_error is None and states() == {"alice": "ok", "bob": "auth_failed"}
    daemon.stop()
    assert_no_secret(daemon.output(), auth_server)
