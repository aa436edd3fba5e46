"""Queries that cannot be parsed and hostile queries: one line saying where and what was expected,
never a database error, never SQL or FTS syntax, the same answer on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from emailops.search.query import MAX_QUERY_CHARS, QueryError, parse
from emailops.search.service import SearchOptions, message_keys
from emailops.store.database import reading
from tests.index_helpers import index_engine
from tests.search_mailbox import ACCOUNT, NOW, build_mailbox, store

MAILBOX = build_mailbox(seed=7, size=25)
OPTIONS = SearchOptions(limit=1_000, now=NOW)
# What a message about a query must never show: the databases' own query languages.
LEAKS = ("MATCH", "SELECT", "fts5", "tsquery", "syntax error", "sqlite", "psycopg", "Traceback", "'s", "'b")


@pytest.mark.parametrize(
    ("query", "position", "expected"),
    [
        ("(((", 3, "expected ) to close the ( here"),
        ("a (b", 3, "expected ) to close the ( here"),
        ('"unclosed', 1, 'expected a closing " for the phrase that starts here'),
        ('subject:"unclosed', 9, 'expected a closing " for the phrase that starts here'),
        ("from:", 6, "expected a value after from:"),
        ("from: alice", 6, "expected a value after from:"),
        ("frm:x", 1, "unknown operator frm:; did you mean from:?"),
        ("x colour:red", 3, "unknown operator colour:; expected one of from:, to:"),
        ("date:2026-13-45", 6, "expected a real date, found '2026-13-45'"),
        ("date:yesterday", 6, "expected a date as YYYY, YYYY-MM or YYYY-MM-DD"),
        ("date:..", 6, "expected a date on at least one side of .."),
        ("newer_than:7", 12, "expected an age after newer_than: such as 12h, 7d"),
        ("larger:huge", 8, "expected a size after larger: such as 20k"),
        ("is:spam", 4, "expected is: followed by one of unread|read|flagged"),
        ("has:wings", 5, "expected has:attachment"),
        ("thread:{a", 8, "expected } to close thread:{ here"),
        ("thread:{}", 8, "expected a query inside thread:{ }"),
        ("a OR", 5, "expected a term after OR"),
        ("OR a", 1, "expected a term before OR"),
        ("a AND", 6, "expected a term after AND"),
        ("NOT", 1, "expected a term after NOT or -"),
        ("a )", 3, "expected a term, found ')' with nothing to close"),
        ("", 1, "expected something to search for"),
        ("*", 1, "expected something to search for"),
        ("subject:***", 9, "expected letters or digits after subject:"),
        ("(" * 40 + "a" + ")" * 40, 33, "expected at most 32 levels"),
        ("a" * (MAX_QUERY_CHARS + 1), MAX_QUERY_CHARS + 1, "expected at most 10,000 characters"),
    ],
)
def test_parse_errors_say_where_and_what_was_expected(query: str, position: int, expected: str) -> None:
    with pytest.raises(QueryError) as raised:
        parse(query)
    message = str(raised.value)
    assert message.startswith(f"at character {position}: ") and expected in message, message
    assert "\n" not in message and not any(leak in message for leak in LEAKS), message


def test_values_are_shown_safely_in_errors() -> None:
    with pytest.raises(QueryError) as raised:
        parse('date:"2026\u202e-01\x00"')
    assert (
        "\\u202e" in str(raised.value)
        and "\x00" not in str(raised.value)
        and "\u202e" not in str(raised.value)
    )


HOSTILE = [
    "NEAR(invoice report)",
    "NEAR(invoice",
    "invoice NEAR/3 report",
    "col:invoice",
    "subject : invoice",
    "{subject}: invoice",
    "*",
    "^invoice",
    "invoice^",
    "inv*ce",
    "**",
    '"*"',
    "a\x00b",
    "invoice\x00",
    "\u202einvoice\u202c",
    "\u200finvoice \u2066report\u2069",
    "' OR 1=1 --",
    "'; DROP TABLE messages; --",
    "invoice' | 'report",
    "invoice & !report",
    "invoice:* <-> report",
    "x" * 5_000,
    "a " * 4_000,
    "(" * 32 + "invoice" + ")" * 32,
    "-" * 50,
    "-invoice -report -plan",
    "zz",
    "\\",
    'invoice \\" report',
    "a" * MAX_QUERY_CHARS * 100,
]


def outcome(engine: Engine, query: str) -> tuple[str, object]:
    try:
        with reading(engine) as conn:
            return "found", sorted(message_keys(conn, ACCOUNT, query, OPTIONS))
    except QueryError as error:
        assert not any(leak in str(error) for leak in LEAKS), str(error)
        return "error", str(error)


@pytest.fixture
def engines(pg_url: str, tmp_path: Path) -> tuple[Engine, Engine]:
    sqlite, postgres = index_engine(f"sqlite:///{tmp_path / 'index.db'}"), index_engine(pg_url)
    store(sqlite, MAILBOX)
    store(postgres, MAILBOX)
    return sqlite, postgres


def test_hostile_queries_answer_the_same_on_both_backends(engines: tuple[Engine, Engine]) -> None:
    sqlite, postgres = engines
    outcomes = {query[:60]: (outcome(sqlite, query), outcome(postgres, query)) for query in HOSTILE}
    differing = {q: pair for q, pair in outcomes.items() if pair[0] != pair[1]}
    assert differing == {}
    kinds = {q: pair[0][0] for q, pair in outcomes.items()}
    # FTS and tsquery syntax is text here: words found, never an error from the database.
    assert kinds["NEAR(invoice report)"] == kinds["\u202einvoice\u202c"] == "found"
    assert kinds["' OR 1=1 --"] == kinds["invoice & !report"] == "found"
    assert kinds["a" * 60] == "error"  # the 1 MB query: too long, said in one line
    assert outcomes["a\x00b"][0] == outcome(sqlite, "a b")
    assert outcomes["\u202einvoice\u202c"][0] == outcome(sqlite, "invoice")
    with reading(sqlite) as conn:  # the DROP TABLE was a search for words
        assert len(message_keys(conn, ACCOUNT, "-zebra", OPTIONS)) == len(MAILBOX)


def test_any_text_parses_or_fails_cleanly_and_answers_alike(engines: tuple[Engine, Engine]) -> None:
    sqlite, postgres = engines
    alphabet = st.characters(codec="utf-8") | st.sampled_from('()"{}*:-^ ORANDNOT\x00\u202e外贸')

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.text(alphabet, max_size=40))
    def check(query: str) -> None:
        assert outcome(sqlite, query) == outcome(postgres, query)

    check()
