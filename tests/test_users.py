"""Console users on SQLite and PostgreSQL: passwords, API tokens, and the audit log of changes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from sqlalchemy import Engine, inspect, select, text, update
from sqlalchemy.exc import DBAPIError
from structlog.testing import capture_logs

import emailops.audit
from emailops.audit import Actor, SecretInAuditError, list_entries, record
from emailops.store.db_clock import db_now
from emailops.store.migrations import MIGRATIONS, migrate
from emailops.store.schema import audit_log, users
from emailops.users import accounts, credentials
from emailops.users.accounts import UserError
from tests.index_helpers import index_engine

ADMIN = Actor(name="cli:ops", role="admin")
WEB = Actor(name="carol", role="admin", source="192.0.2.7")
PASSWORD = "correct horse battery staple"


class CountingHasher(PasswordHasher):
    """The project's hasher, counting its verify calls (the cost of a sign-in attempt)."""

    def __init__(self) -> None:
        super().__init__()
        self.verified: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


@pytest.fixture
def engine(db_url: str) -> Engine:
    return index_engine(db_url)


@pytest.fixture
def hasher(monkeypatch: pytest.MonkeyPatch) -> CountingHasher:
    counting = CountingHasher()
    monkeypatch.setattr(credentials, "HASHER", counting)
    return counting


def all_values(engine: Engine) -> list[str]:
    """Every value of every row of every table, as text."""
    values: list[str] = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):  # noqa: S608 (reflected names)
                values += [str(bytes(v) if isinstance(v, memoryview) else v) for v in row]
    return values


def test_a_password_signs_in_its_user_and_nothing_else(engine: Engine) -> None:
    accounts.add_user(engine, "alice", "operator", PASSWORD, actor=ADMIN)
    accounts.add_user(engine, "bob", "viewer", PASSWORD + "!", actor=ADMIN)
    user = accounts.verify_sign_in(engine, "alice", PASSWORD)
    assert user is not None and (user.name, user.role) == ("alice", "operator")
    assert accounts.verify_sign_in(engine, "alice", PASSWORD + "!") is None  # bob's
    assert accounts.verify_sign_in(engine, "alice", "") is None
    assert accounts.verify_sign_in(engine, "nobody", PASSWORD) is None
    assert accounts.verify_sign_in(engine, "alice", "x" * (credentials.MAX_PASSWORD_LENGTH + 1)) is None
    with engine.connect() as conn:
        stored = conn.execute(select(users.c.password_hash).where(users.c.name == "alice")).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_a_disabled_user_cannot_sign_in_until_enabled(engine: Engine) -> None:
    accounts.add_user(engine, "alice", "admin", PASSWORD, actor=ADMIN)
    assert accounts.disable_user(engine, "alice", actor=ADMIN) is True
    assert accounts.disable_user(engine, "alice", actor=ADMIN) is False
    assert accounts.verify_sign_in(engine, "alice", PASSWORD) is None
    assert accounts.enable_user(engine, "alice", actor=ADMIN) is True
    assert accounts.verify_sign_in(engine, "alice", PASSWORD) is not None


def test_a_new_password_replaces_the_old_one(engine: Engine) -> None:
    accounts.add_user(engine, "alice", "viewer", PASSWORD, actor=ADMIN)
    accounts.set_password(engine, "alice", "another long pass phrase", actor=ADMIN)
    assert accounts.verify_sign_in(engine, "alice", PASSWORD) is None
    assert accounts.verify_sign_in(engine, "alice", "another long pass phrase") is not None


def test_unknown_disabled_and_wrong_attempts_cost_one_argon2_verify_each(
    engine: Engine, hasher: CountingHasher
) -> None:
    """No user enumeration by timing: every failed attempt does the work a right one does."""
    accounts.add_user(engine, "alice", "viewer", PASSWORD, actor=ADMIN)
    accounts.add_user(engine, "bob", "viewer", PASSWORD, actor=ADMIN)
    accounts.disable_user(engine, "bob", actor=ADMIN)
    with engine.connect() as conn:
        alice_hash = conn.execute(select(users.c.password_hash).where(users.c.name == "alice")).scalar_one()
    for name, password in (("alice", PASSWORD), ("alice", "wrong password here"), ("nobody", PASSWORD)):
        hasher.verified.clear()
        accounts.verify_sign_in(engine, name, password)
        assert len(hasher.verified) == 1, name
    assert hasher.verified[0] != alice_hash  # the unknown user's attempt checked a dummy hash
    hasher.verified.clear()
    assert accounts.verify_sign_in(engine, "bob", PASSWORD) is None
    assert len(hasher.verified) == 1
    assert hasher.verified[0] == credentials.DUMMY_HASH


def test_the_dummy_hash_has_the_parameters_of_real_ones() -> None:
    """So checking it costs what checking a real hash does (else a refusal's delay tells)."""
    real = credentials.hash_password(PASSWORD)
    assert credentials.DUMMY_HASH.split("$")[:4] == real.split("$")[:4]
    assert not credentials.needs_rehash(credentials.DUMMY_HASH)


def test_a_hash_made_with_older_parameters_is_replaced_at_the_next_sign_in(engine: Engine) -> None:
    accounts.add_user(engine, "alice", "viewer", PASSWORD, actor=ADMIN)
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    with engine.begin() as conn:
        conn.execute(update(users).where(users.c.name == "alice").values(password_hash=weak))
    assert credentials.needs_rehash(weak)
    assert accounts.verify_sign_in(engine, "alice", "not the password") is None
    with engine.connect() as conn:
        assert conn.execute(select(users.c.password_hash)).scalar_one() == weak  # only after a success
    assert accounts.verify_sign_in(engine, "alice", PASSWORD) is not None
    with engine.connect() as conn:
        upgraded = conn.execute(select(users.c.password_hash)).scalar_one()
    assert upgraded != weak and not credentials.needs_rehash(upgraded)
    assert accounts.verify_sign_in(engine, "alice", PASSWORD) is not None


def test_an_api_token_is_returned_once_and_only_its_hash_is_stored(engine: Engine, db_url: str) -> None:
    accounts.add_user(engine, "alice", "operator", PASSWORD, actor=ADMIN)
    token = accounts.issue_api_token(engine, "alice", actor=ADMIN)
    assert token.startswith(credentials.TOKEN_PREFIX) and len(token) >= 40
    user = accounts.verify_api_token(engine, token)
    assert user is not None and user.name == "alice" and user.has_api_token
    values = all_values(engine)
    assert credentials.token_digest(token) in values
    assert not [value for value in values if token in value or token[3:] in value]
    if db_url.startswith("sqlite"):
        engine.dispose()
        files = Path(db_url.removeprefix("sqlite:///")).parent.glob("index.sqlite3*")
        assert not [f for f in files if token[3:].encode() in f.read_bytes()]
    assert accounts.verify_api_token(engine, token[:-1]) is None
    assert accounts.verify_api_token(engine, credentials.token_digest(token)) is None


def test_a_new_token_revokes_the_old_and_a_disabled_users_token_is_refused(engine: Engine) -> None:
    accounts.add_user(engine, "alice", "operator", PASSWORD, actor=ADMIN)
    first = accounts.issue_api_token(engine, "alice", actor=ADMIN)
    second = accounts.issue_api_token(engine, "alice", actor=ADMIN)
    assert first != second
    assert accounts.verify_api_token(engine, first) is None
    assert accounts.verify_api_token(engine, second) is not None
    accounts.disable_user(engine, "alice", actor=ADMIN)
    assert accounts.verify_api_token(engine, second) is None
    accounts.enable_user(engine, "alice", actor=ADMIN)
    accounts.remove_user(engine, "alice", actor=ADMIN)
    assert accounts.verify_api_token(engine, second) is None


@pytest.mark.parametrize(
    ("name", "role", "password", "why"),
    [
        ("alice", "root", PASSWORD, "is not a role"),
        ("cli:alice", "viewer", PASSWORD, "is not a user name"),
        ("", "viewer", PASSWORD, "is not a user name"),
        ("a" * 101, "viewer", PASSWORD, "is not a user name"),
        ("alice", "viewer", "fourteen chars", "15 to 1024 characters"),
    ],
)
def test_an_invalid_user_is_refused_and_nothing_recorded(
    engine: Engine, name: str, role: str, password: str, why: str
) -> None:
    with pytest.raises(UserError, match=why):
        accounts.add_user(engine, name, role, password, actor=ADMIN)
    with engine.connect() as conn:
        assert accounts.list_users(conn) == [] and list_entries(conn) == []


def test_changes_to_a_missing_or_existing_user_are_refused(engine: Engine) -> None:
    accounts.add_user(engine, "alice", "viewer", PASSWORD, actor=ADMIN)
    with pytest.raises(UserError, match="exists already"):
        accounts.add_user(engine, "alice", "admin", PASSWORD, actor=ADMIN)
    for change in (
        lambda: accounts.disable_user(engine, "bob", actor=ADMIN),
        lambda: accounts.enable_user(engine, "bob", actor=ADMIN),
        lambda: accounts.remove_user(engine, "bob", actor=ADMIN),
        lambda: accounts.set_password(engine, "bob", PASSWORD, actor=ADMIN),
        lambda: accounts.issue_api_token(engine, "bob", actor=ADMIN),
    ):
        with pytest.raises(UserError, match="no user 'bob'"):
            change()
    with engine.connect() as conn:
        assert [e.action for e in list_entries(conn)] == ["user.add"]


def test_every_change_is_one_audit_row_and_one_audit_log_line(engine: Engine) -> None:
    with capture_logs() as logs:
        accounts.add_user(engine, "alice", "operator", PASSWORD, actor=WEB)
        accounts.set_password(engine, "alice", "another long pass phrase", actor=WEB)
        token = accounts.issue_api_token(engine, "alice", actor=WEB)
        accounts.disable_user(engine, "alice", actor=WEB)
        accounts.enable_user(engine, "alice", actor=WEB)
        accounts.remove_user(engine, "alice", actor=WEB)
    with engine.connect() as conn:
        entries = list(reversed(list_entries(conn)))
    expected = [
        ("user.add", None, {"name": "alice", "role": "operator", "disabled": False}),
        ("user.passwd", None, None),
        ("user.token", {"has_api_token": False}, {"has_api_token": True}),
        ("user.disable", {"disabled": False}, {"disabled": True}),
        ("user.enable", {"disabled": True}, {"disabled": False}),
        ("user.remove", {"name": "alice", "role": "operator", "disabled": False}, None),
    ]
    assert [(e.action, e.before, e.after) for e in entries] == expected
    assert {(e.actor, e.role, e.source, e.target) for e in entries} == {
        ("carol", "admin", "192.0.2.7", "alice")
    }
    assert [e.at for e in entries] == sorted(e.at for e in entries)
    lines = [line for line in logs if line.get("component") == "audit"]
    assert [(line["action"], line["before"], line["after"]) for line in lines] == expected
    assert [line["audit_id"] for line in lines] == [e.id for e in entries]
    assert {(line["actor"], line["source"], line["target"]) for line in lines} == {
        ("carol", "192.0.2.7", "alice")
    }
    for secret in (PASSWORD, "another long pass phrase", token, token[3:]):
        assert secret not in repr(logs) and secret not in repr(entries)


def test_audit_rows_survive_the_removal_of_their_user(engine: Engine) -> None:
    accounts.add_user(engine, "carol", "admin", PASSWORD, actor=ADMIN)
    record(engine, Actor("carol", "admin", "192.0.2.7"), "outbox.resolve", "reply 12", after={"as": "sent"})
    accounts.remove_user(engine, "carol", actor=ADMIN)
    with engine.connect() as conn:
        mine = list_entries(conn, actor="carol")
        assert [(e.action, e.target, e.after) for e in mine] == [
            ("outbox.resolve", "reply 12", {"as": "sent"})
        ]
        assert [e.action for e in list_entries(conn, actions=["user.add", "user.remove"])] == [
            "user.remove",
            "user.add",
        ]


def test_the_audit_log_offers_no_change_and_the_database_refuses_one(engine: Engine) -> None:
    assert not [
        name
        for name in dir(emailops.audit)
        if any(word in name.lower() for word in ("update", "delete", "remove", "purge", "clear", "edit"))
    ]
    record(engine, ADMIN, "user.add", "alice", after={"role": "viewer"})
    for statement in (
        update(audit_log).values(actor="someone else"),
        audit_log.delete(),
    ):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    with engine.connect() as conn:
        assert [(e.actor, e.after) for e in list_entries(conn)] == [("cli:ops", {"role": "viewer"})]


@pytest.mark.parametrize("key", sorted(emailops.audit.SECRET_KEYS))
def test_an_audit_record_that_names_a_secret_is_refused(engine: Engine, key: str) -> None:
    with capture_logs() as logs, pytest.raises(SecretInAuditError, match=key):
        record(engine, ADMIN, "user.passwd", "alice", after={key: "hunter2hunter2hunter2"})
    with engine.connect() as conn:
        assert list_entries(conn) == []
    assert logs == []


def test_audit_entries_filter_by_time_action_and_actor(engine: Engine) -> None:
    first = record(engine, ADMIN, "user.add", "alice")

    # The second entry comes once the database's clock has moved on (two records can share a tick).
    def later(moment: datetime) -> bool:
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)) > first.at

    with engine.connect() as conn:
        while not later(conn.execute(select(db_now(conn))).scalar_one()):
            pass
    second = record(engine, WEB, "outbox.resolve", "reply 3")
    with engine.connect() as conn:
        assert [e.id for e in list_entries(conn)] == [second.id, first.id]
        assert [e.id for e in list_entries(conn, since=second.at)] == [second.id]
        assert list_entries(conn, since=second.at.replace(year=second.at.year + 1)) == []
        assert [e.id for e in list_entries(conn, actions=["outbox.resolve"])] == [second.id]
        assert [e.id for e in list_entries(conn, actor="cli:ops")] == [first.id]
        assert [e.id for e in list_entries(conn, limit=1)] == [second.id]


def test_the_users_migration_runs_again_on_a_database_brought_back_before_it(engine: Engine) -> None:
    record(engine, ADMIN, "user.add", "alice")
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM schema_migrations WHERE version >= 17")
    assert [m.version for m in migrate(engine)] == [m.version for m in MIGRATIONS if m.version >= 17]
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(audit_log.delete())
    with engine.connect() as conn:
        assert [e.target for e in list_entries(conn)] == ["alice"]
