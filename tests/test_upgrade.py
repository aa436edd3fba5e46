"""An existing single-account deployment upgrades with no change to its ``.env``: the previous
release's index (tests/fixtures/upgrade/, made by that release's daemon, see its README) and the
same ``EMAIL_*`` environment start the current daemon (``python -m prod.run``, WORKERS=2), on
SQLite and PostgreSQL. The migrations apply, the folder keeps its state (no message indexed
again), new mail is indexed and answered once, a sender answered before the upgrade is not
answered again, mail there before is never answered, and ``accounts list`` shows the account."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url

from emailops.store.migrations import MIGRATIONS
from emailops.store.schema import folders, messages, outbox, schema_migrations
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from tests.index_helpers import ALICE, daemon_env
from tests.test_accounts import run
from tests.test_daemon_e2e import healthcheck, wait_for

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "upgrade"


def new_mail(n: int, sender: int, subject: str) -> bytes:
    return (
        f"From: Sender {sender} <sender{sender}@example.org>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <upgrade-{n}@example.org>\r\nDate: Wed, 3 Jan 2024 10:00:00 +0000\r\n\r\n"
        f"body of upgrade mail {n} upgradetoken{n}x\r\n"
    ).encode()


def restore_postgres(url: str, dump: Path) -> None:
    """The previous release's pg_dump (plain SQL) into the empty database at ``url``."""
    parts = make_url(url)
    conninfo = f"host={parts.host} port={parts.port} user={parts.username} dbname={parts.database}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(dump.read_text())  # type: ignore[arg-type]  # a whole dump, no parameters


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def previous_index(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a copy of the previous release's index, on SQLite or on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        copy = tmp_path / "emailops.db"
        shutil.copyfile(FIXTURES / "index.sqlite3", copy)
        return f"sqlite:///{copy}"
    url = str(request.getfixturevalue("pg_url"))
    restore_postgres(url, FIXTURES / "index.pg.sql")
    return url


@pytest.fixture
def engine(previous_index: str) -> Iterator[Engine]:
    from emailops.store.database import create_index_engine

    engine = create_index_engine(previous_index)
    yield engine
    engine.dispose()


def the_same_mailbox(dovecot: LocalDovecot, engine: Engine) -> None:
    """Alice's mailbox as the previous release left it: its three messages, the UIDVALIDITY the
    index holds (the same server, upgraded in place)."""
    with engine.connect() as conn:
        uidvalidity, uidnext = conn.execute(select(folders.c.uidvalidity, folders.c.uidnext)).one()
    for name in ("01.eml", "02.eml", "03.eml"):
        dovecot.deliver(ALICE, (FIXTURES / "mailbox" / name).read_bytes())
    dovecot.doveadm("mailbox", "update", "-u", ALICE, "--uid-validity", str(uidvalidity), "INBOX")
    status = dovecot.doveadm("mailbox", "status", "-u", ALICE, "uidvalidity uidnext", "INBOX").stdout
    assert status.split() == ["INBOX", f"uidnext={uidnext}", f"uidvalidity={uidvalidity}"]


def test_the_previous_release_index_and_env_start_and_keep_indexing(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, previous_index: str, engine: Engine, tmp_path: Path
) -> None:
    the_same_mailbox(dovecot, engine)
    shutil.copyfile(FIXTURES / "rules.toml", tmp_path / "rules.toml")
    with engine.connect() as conn:
        before_migrations = conn.execute(select(func.max(schema_migrations.c.version))).scalar_one()
        folder_before = conn.execute(select(folders.c.id, folders.c.account, folders.c.last_sync_at)).one()
        ids_before = conn.execute(select(messages.c.id, messages.c.subject).order_by(messages.c.id)).all()
    assert before_migrations < MIGRATIONS[-1].version and len(ids_before) == 3

    # The previous release's environment: EMAIL_* only (no SECRETS_KEY, no account name).
    env = daemon_env(
        dovecot,
        tmp_path,
        INDEX_DB_URL=previous_index,
        EMAIL_SMTP_PORT=str(smtp_relay.port),
        WORKERS="2",
        SHUTDOWN_TIMEOUT_SECONDS="10",
    )
    with (tmp_path / "stdout.log").open("w") as out, (tmp_path / "stderr.log").open("w") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, stdout=out, stderr=err
        )
    try:

        def synced_again() -> bool:
            with engine.connect() as conn:
                last = conn.execute(select(folders.c.last_sync_at).where(folders.c.id == folder_before.id))
                return last.scalar_one() > folder_before.last_sync_at

        wait_for(lambda: healthcheck(env).returncode == 0, 60, "healthy")
        wait_for(synced_again, 60, "the folder synced by the current release")
        with engine.connect() as conn:
            assert (
                conn.execute(select(func.max(schema_migrations.c.version))).scalar_one()
                == MIGRATIONS[-1].version
            )
            # The same folder row, the same three messages: nothing indexed again.
            assert conn.execute(select(folders.c.id, folders.c.account)).all() == [tuple(folder_before[:2])]
            assert (
                conn.execute(select(messages.c.id, messages.c.subject).order_by(messages.c.id)).all()
                == ids_before
            )

        # Sender 2 was answered by the previous release; sender 5 is new. Mail 01 (sender 1, "help")
        # was there before the first sync: never answered.
        dovecot.deliver(ALICE, new_mail(4, 2, "help again"))
        dovecot.deliver(ALICE, new_mail(5, 5, "help now"))

        def rules_done() -> bool:
            with engine.connect() as conn:
                states = conn.execute(select(messages.c.rules_state).where(messages.c.id > ids_before[-1].id))
                return sorted(states.scalars()) == ["done", "done"]

        wait_for(lambda: len(smtp_relay.accepted) >= 1, 60, "the reply to the new sender")
        wait_for(rules_done, 60, "the rules on both new messages")

        def outbox_rows() -> list[tuple[object, ...]]:
            with engine.connect() as conn:
                query = select(outbox.c.recipient, outbox.c.state).order_by(outbox.c.id)
                return [tuple(row) for row in conn.execute(query).all()]

        wait_for(lambda: outbox_rows()[-1][1] == "sent", 30, "the new reply recorded as sent")
        assert [m.rcpt_tos for m in smtp_relay.accepted] == [("sender5@example.org",)]
        assert outbox_rows() == [("sender2@example.org", "sent"), ("sender5@example.org", "sent")]
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 5

        searched = run(env, "search", "upgradetoken2x", "--json")
        assert searched.returncode == 0, searched.stderr
        assert [hit["subject"] for hit in json.loads(searched.stdout)] == ["help please"]
        listed = run(env, "accounts", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        (account,) = json.loads(listed.stdout)
        assert {
            key: account[key] for key in ("name", "username", "enabled", "state", "folders", "messages")
        } == {
            "name": ALICE,
            "username": ALICE,
            "enabled": True,
            "state": "ok",
            "folders": ["INBOX"],
            "messages": 5,
        }
        assert account["last_sync"] is not None and account["last_error"] is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    assert daemon.returncode == 0, (tmp_path / "stdout.log").read_text()[-3000:]
