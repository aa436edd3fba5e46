"""Fixtures for real servers: a fresh Dovecot (or Cyrus) per test, an SMTP relay into it, databases.

``imap_server`` runs a test once against Dovecot and once against Cyrus IMAP (unpacked from
Debian's packages, see localmail.cyrus_packages); the tests of behaviour that every IMAP server
must give the daemon (sync, IDLE, flags, expunges, UIDVALIDITY, replies, dropped connections)
take it. Other tests use ``dovecot``, whose configuration can also hide capabilities or add TLS.

PostgreSQL is the server at 127.0.0.1:5432 (trust auth, user ``postgres``); each test that asks
for it gets a new, empty database that is dropped afterwards. ``EMAILOPS_TEST_PG_ADMIN`` (a libpq
connection string) points the fixtures at another server. A missing server fails the tests that
need it instead of skipping them: bin/test starts it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from localmail.cyrus import LocalCyrus
from localmail.dovecot import LocalDovecot
from localmail.imap_server import LocalImapServer
from localmail.smtp_relay import LocalSmtpRelay

MAIL_USERS = {"alice@example.test": "alice-pw", "bob@example.test": "bob-pw"}
PG_ADMIN_CONNINFO = os.environ.get(
    "EMAILOPS_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_TEST_DATABASE_PREFIX = "emailops_test_"


@pytest.fixture
def mail_users() -> dict[str, str]:
    """The accounts of the ``dovecot`` fixtures: login name to password."""
    return dict(MAIL_USERS)


@pytest.fixture
def dovecot() -> Iterator[LocalDovecot]:
    """A started Dovecot (no TLS) with alice@example.test/alice-pw and bob@example.test/bob-pw."""
    with LocalDovecot(MAIL_USERS) as server:
        yield server


@pytest.fixture
def dovecot_tls() -> Iterator[LocalDovecot]:
    """As ``dovecot``, plus IMAPS and STARTTLS with a test CA (``dovecot_tls.ca_file``)."""
    with LocalDovecot(MAIL_USERS, tls=True) as server:
        yield server


@pytest.fixture(params=["dovecot", "cyrus"])
def imap_server(request: pytest.FixtureRequest) -> Iterator[LocalImapServer]:
    """A started Dovecot, then a started Cyrus, each with the accounts of ``dovecot`` (no TLS).

    A Cyrus that is not unpacked fails the test (bin/test unpacks it), as a missing Dovecot does.
    """
    server_class: type[LocalDovecot | LocalCyrus] = LocalDovecot if request.param == "dovecot" else LocalCyrus
    with server_class(MAIL_USERS) as server:
        yield server


@pytest.fixture
def smtp_relay(request: pytest.FixtureRequest) -> Iterator[LocalSmtpRelay]:
    """A started SMTP relay (AUTH with the same accounts, no TLS) that delivers into the test's
    ``imap_server`` if it has one, else into ``dovecot``."""
    server_fixture = "imap_server" if "imap_server" in request.fixturenames else "dovecot"
    server: LocalImapServer = request.getfixturevalue(server_fixture)
    with LocalSmtpRelay(server, MAIL_USERS) as relay:
        yield relay


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(PG_ADMIN_CONNINFO, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(
            f"PostgreSQL is not reachable ({PG_ADMIN_CONNINFO}): {error}. bin/test starts it; by "
            "hand: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            pytrace=False,
        )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """SQLAlchemy URL of a new, empty PostgreSQL database, dropped after the test."""
    name = PG_TEST_DATABASE_PREFIX + uuid.uuid4().hex[:16]
    with _admin_connection() as admin:
        # WAL_LOG (PostgreSQL 15's default) avoids the checkpoint FILE_COPY forces, which costs
        # 0.5 to 2 s on this disk; a whole create and drop takes about 0.3 to 0.6 s.
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY WAL_LOG')
    server = conninfo_to_dict(PG_ADMIN_CONNINFO)
    user, host, port = (
        server.get("user", "postgres"),
        server.get("host", "127.0.0.1"),
        server.get("port", 5432),
    )
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        with _admin_connection() as admin:
            # FORCE ends sessions a test left open (a pool not disposed, a killed worker).
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An index database URL, once for SQLite (a file in tmp_path) and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))
