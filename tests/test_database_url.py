"""INDEX_DB_URL parsing (no SQLAlchemy on the settings and healthcheck path)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from prod.database_url import parse_database_url

VALID = [
    "sqlite:////data/emailops.db",
    "sqlite:///relative/emailops.db",
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql://user:p%40ss@db.example.org/emailops?sslmode=require",
]


@pytest.mark.parametrize("url", VALID)
def test_valid_urls_agree_with_sqlalchemy(url: str) -> None:
    ours = parse_database_url(url)
    theirs = make_url(url)
    assert ours.backend == theirs.get_backend_name()
    assert ours.database == theirs.database
    assert (ours.host, ours.port, ours.username, ours.password) == (
        theirs.host,
        theirs.port,
        theirs.username,
        theirs.password,
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("foo", "is not a database URL"),
        ("mysql://root@localhost/db", "must be sqlite"),
        ("sqlite://", "names no SQLite file"),
        ("sqlite:///", "names no SQLite file"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("postgresql+psycopg://host:99999/db", "port"),
        ("postgresql+psycopg:///db", "names no PostgreSQL host"),
        ("postgresql+psycopg://host/", "names no PostgreSQL database"),
    ],
)
def test_malformed_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_database_url(url)


def test_masking_hides_the_password_only() -> None:
    url = "postgresql+psycopg://emailops:s3cret@db:5432/index"
    assert parse_database_url(url).masked(url) == "postgresql+psycopg://emailops:***@db:5432/index"
    assert "s3cret" not in repr(parse_database_url(url))


def test_masking_keeps_an_at_sign_in_the_query_apart_from_the_password() -> None:
    url = "postgresql+psycopg://emailops:p%40ss@db/index?application_name=worker@host"
    assert parse_database_url(url).masked(url) == (
        "postgresql+psycopg://emailops:***@db/index?application_name=worker@host"
    )
