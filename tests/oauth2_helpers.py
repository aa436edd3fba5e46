"""Shared values and builders for the OAuth2 tests: a client registered at LocalOAuth2Server,
an encryption key, configs and daemon environments pointing at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emailops.accounts.config import AccountConfig, Endpoint, OAuth2Options
from emailops.config import OAuth2Config, OAuth2Flow, TlsSecurity
from localmail.dovecot import LocalDovecot
from localmail.oauth2_server import LocalOAuth2Server
from prod.runtime_settings import RuntimeSettings
from tests.conftest import MAIL_USERS
from tests.index_helpers import ACCOUNT, ALICE, daemon_env

CLIENT_ID = "emailops-test-client"
# Distinctive values, looked for in every output by the secrets tests.
CLIENT_SECRET = "eo-cs-5f1e0c2d9a8b7c6d"
TOKEN_KEY = "u4p3Vd9HkQ1v6mN2xR8sT0yZ5bC7eF1gH3jK5lM7nP0="
APP_CLIENT_ID = "emailops-app-client"


class Clock:
    """A token source's clock that the test moves (e.g. past FRESH_TOKEN_AGE without waiting)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def delegated_client(n: int) -> tuple[str, str]:
    """The id and secret of the ``n``-th delegated client of ``oauth2_server``: CLIENT_ID and
    CLIENT_SECRET for 0, then clients of their own (no secret is part of another)."""
    if n == 0:
        return CLIENT_ID, CLIENT_SECRET
    return f"{CLIENT_ID}-{n}", f"eo-cs-{n}-7d3a9e41b0c2"


def oauth2_server(clients: int = 1, **options: object) -> LocalOAuth2Server:
    """Knowing ``clients`` delegated clients (``delegated_client``) and APP_CLIENT_ID (app-only)."""
    registered: dict[str, str | None] = dict(delegated_client(n) for n in range(clients))
    return LocalOAuth2Server(
        registered | {APP_CLIENT_ID: CLIENT_SECRET},
        app_users={APP_CLIENT_ID: ALICE},
        **options,  # type: ignore[arg-type]
    )


def oauth2_account(
    name: str,
    username: str,
    server: LocalOAuth2Server,
    dovecot: LocalDovecot,
    smtp_port: int,
    client: int = 0,
) -> AccountConfig:
    """An account for the index: ``username`` on ``dovecot`` and the SMTP relay at ``smtp_port``
    (no TLS), signing in as the ``client``-th delegated client of ``server``, with a refresh
    token issued to it there (``.oauth2.refresh_token``)."""
    client_id, client_secret = delegated_client(client)
    return AccountConfig(
        name=name,
        username=username,
        password="",
        imap=Endpoint(dovecot.host, dovecot.imap_port, TlsSecurity.NONE),
        smtp=Endpoint("127.0.0.1", smtp_port, TlsSecurity.NONE),
        oauth2=OAuth2Options(
            provider="custom",
            client_id=client_id,
            client_secret=client_secret,
            refresh_token=server.issue_refresh_token(username, client_id),
            token_url=server.token_url,
            authorize_url=server.authorize_url,
            scopes=("mail", "offline_access"),
        ),
    )


def oauth2_config(server: LocalOAuth2Server, **overrides: object) -> OAuth2Config:
    values: dict[str, object] = {
        "account": ACCOUNT,
        "username": ALICE,
        "provider": "custom",
        "flow": OAuth2Flow.REFRESH_TOKEN,
        "token_url": server.token_url,
        "device_url": server.device_url,
        "scopes": ("mail", "offline_access"),
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_keys": (TOKEN_KEY,),
        "timeout_seconds": 10.0,
    }
    values.update(overrides)
    return OAuth2Config(**values)  # type: ignore[arg-type]


def oauth2_settings(token_url: str, refresh_token: str, index_db_url: str) -> RuntimeSettings:
    """A worker's settings signing in as ALICE at ``token_url`` with ``refresh_token``."""
    return RuntimeSettings.from_env(
        email_username=ALICE,
        email_imap_host="127.0.0.1",
        email_imap_port=143,
        email_smtp_host="127.0.0.1",
        email_smtp_port=25,
        email_auth="oauth2",
        email_oauth2_provider="custom",
        email_oauth2_token_url=token_url,
        email_oauth2_client_id=CLIENT_ID,
        email_oauth2_client_secret=CLIENT_SECRET,
        email_oauth2_token_key=TOKEN_KEY,
        email_oauth2_refresh_token=refresh_token,
        index_db_url=index_db_url,
    )


def oauth2_env(
    dovecot: LocalDovecot, server: LocalOAuth2Server, data: Path, **overrides: str
) -> dict[str, str]:
    """``daemon_env`` signing in with OAuth2 at ``server`` (no EMAIL_PASSWORD)."""
    env = daemon_env(
        dovecot,
        data,
        EMAIL_AUTH="oauth2",
        EMAIL_OAUTH2_PROVIDER="custom",
        EMAIL_OAUTH2_TOKEN_URL=server.token_url,
        EMAIL_OAUTH2_DEVICE_URL=server.device_url,
        EMAIL_OAUTH2_SCOPES="mail offline_access",
        EMAIL_OAUTH2_CLIENT_ID=CLIENT_ID,
        EMAIL_OAUTH2_CLIENT_SECRET=CLIENT_SECRET,
        EMAIL_OAUTH2_TOKEN_KEY=TOKEN_KEY,
    )
    del env["EMAIL_PASSWORD"]
    env.update(overrides)
    return env


@pytest.fixture
def auth_server() -> Iterator[LocalOAuth2Server]:
    """A started LocalOAuth2Server knowing two delegated clients (``delegated_client``) and
    APP_CLIENT_ID (app-only)."""
    with oauth2_server(clients=2) as server:
        yield server


@pytest.fixture
def dovecot_oauth2(auth_server: LocalOAuth2Server) -> Iterator[LocalDovecot]:
    """A Dovecot whose accounts also sign in with XOAUTH2/OAUTHBEARER tokens of ``auth_server``."""
    with LocalDovecot(MAIL_USERS, oauth2_introspection_url=auth_server.introspection_url) as server:
        yield server


def bearer_user(server: LocalOAuth2Server) -> Callable[[str], str | None]:
    """For LocalSmtpRelay(bearer_user=...): the account a token of ``server`` is valid for."""

    def check(token: str) -> str | None:
        answer = server.introspect(token)
        return str(answer["username"]) if answer.get("active") else None

    return check
