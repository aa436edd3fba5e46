"""The search language on both backends against a brute-force filter: for generated queries over a
generated mailbox, SQLite and PostgreSQL return exactly the same messages, and both equal what
``tests.search_mailbox.expected`` finds by reading the parsed messages."""

from __future__ import annotations

import itertools
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from emailops.search import compiler, service
from emailops.search.query import parse
from emailops.search.service import SearchOptions, Sort, count, message_keys, search
from emailops.store.database import reading
from tests.index_helpers import index_engine
from tests.search_mailbox import (
    ACCOUNT,
    NOW,
    PEOPLE,
    TIMEZONE,
    USERNAME,
    WORDS,
    Stored,
    build_mailbox,
    expected,
    store,
)

MAILBOX = build_mailbox(seed=2026)
OPTIONS = SearchOptions(
    limit=10_000, timezone=TIMEZONE, now=NOW, account_names=frozenset({USERNAME, ACCOUNT})
)


def _chunks(text: str) -> list[str]:
    return [c for c in text.replace('"', " ").split() if c]


def _phrases(s: Stored) -> list[str]:
    found = []
    for text in (s.parsed.subject, s.parsed.body_text[:300]):
        chunks = _chunks(text)
        found += [f"{a} {b}" for a, b in itertools.pairwise(chunks)]
    return found


PHRASES = sorted({p for s in MAILBOX for p in _phrases(s)})
CJK_WORDS = [w for w in WORDS if not w.isascii() and all(ord(c) > 0x3000 for c in w)]

cjk_fragments = st.sampled_from(CJK_WORDS).flatmap(
    lambda w: st.tuples(st.integers(0, len(w) - 1), st.integers(1, len(w))).map(
        lambda ij: w[min(ij) : max(ij[0] + 1, ij[1])]
    )
)
words = st.one_of(st.sampled_from([*WORDS, "absent", "zebra"]), cjk_fragments)
prefixes = st.sampled_from([w for w in WORDS if w.isascii()]).flatmap(
    lambda w: st.integers(1, len(w)).map(lambda k: w[:k] + "*")
)
phrases = st.sampled_from(PHRASES).map(lambda p: f'"{p}"')
text_values = st.one_of(words, prefixes, phrases)

free_text = text_values
field_text = st.tuples(st.sampled_from(["subject", "body"]), text_values).map(lambda t: f"{t[0]}:{t[1]}")
attachment_text = st.sampled_from(
    ["report", "invoice", "2026", "jpg", "résumé", "外贸", '"report q3"', "photo*", "清单"]
).map(lambda v: f"attachment:{v}")


def _address_values(person: object) -> list[str]:
    email = person.email  # type: ignore[attr-defined]
    name = person.name  # type: ignore[attr-defined]
    local, _, domain = email.partition("@")
    values = [email, email.upper(), local, domain, email[:5] + "*"]
    values += name.split()
    if " " in name:
        values.append(f'"{name}"')
    return values


address_values = st.sampled_from(
    sorted({v for p in PEOPLE for v in _address_values(p)} | {"nobody@nowhere.example", "example"})
)
addresses = st.tuples(st.sampled_from(["from", "to", "cc", "recipient"]), address_values).map(
    lambda t: f"{t[0]}:{t[1]}"
)
ids = st.sampled_from([s for s in MAILBOX if s.parsed.message_id]).flatmap(
    lambda s: st.sampled_from([f"id:{s.parsed.message_id}", f"id:{(s.parsed.message_id or '')[1:-1]}"])
)
thread_keys = st.sampled_from(MAILBOX).map(lambda s: f"thread:{s.parsed.thread_key}")
others = st.sampled_from(
    [
        "folder:INBOX",
        "folder:inbox",
        "folder:Archive",
        "folder:Nope",
        "account:alice@example.test",
        "account:ALICE@example.test",
        "account:bob@example.test",
        "has:attachment",
        *(
            f"is:{f}"
            for f in ("unread", "read", "flagged", "answered", "draft", "deleted", "replied", "quarantined")
        ),
        *(
            f"mimetype:{t}"
            for t in ("application/pdf", "image", "image/*", "text/plain", "application", "video")
        ),
        "larger:1k",
        "larger:5000",
        "smaller:2k",
        "smaller:30k",
        "larger:20k",
    ]
)
months = st.integers(1, 12)
days = st.dates(min_value=date(2025, 12, 1), max_value=date(2027, 1, 31))
dates = st.one_of(
    months.map(lambda m: f"date:2026-{m:02d}"),
    st.tuples(days, days).map(lambda d: f"date:{min(d)}..{max(d)}"),
    days.map(lambda d: f"date:{d}.."),
    days.map(lambda d: f"date:..{d}"),
    days.map(lambda d: f"date:{d}"),
    days.map(lambda d: f"after:{d}"),
    days.map(lambda d: f"before:{d}"),
    st.tuples(st.integers(1, 400), st.sampled_from("hdwmy")).map(lambda t: f"newer_than:{t[0]}{t[1]}"),
    st.tuples(st.integers(1, 400), st.sampled_from("hdwmy")).map(lambda t: f"older_than:{t[0]}{t[1]}"),
)
leaves = st.one_of(
    free_text, free_text, field_text, attachment_text, addresses, addresses, ids, thread_keys, others, dates
)


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.tuples(children, children)
    return st.one_of(
        pairs.map(lambda p: f"({p[0]} {p[1]})"),
        pairs.map(lambda p: f"({p[0]} AND {p[1]})"),
        pairs.map(lambda p: f"({p[0]} OR {p[1]})"),
        children.map(lambda c: f"-{c}" if c.startswith("(") else f"NOT {c}"),
        children.map(lambda c: f"thread:{{{c}}}"),
    )


queries = st.recursive(leaves, _combine, max_leaves=6)


def _keys(engine: Engine, query: str) -> set[tuple[str, int, int]]:
    with reading(engine) as conn:
        keys = message_keys(conn, ACCOUNT, query, OPTIONS)
        assert count(conn, ACCOUNT, query, OPTIONS) == len(keys)
    assert len(set(keys)) == len(keys), query
    return set(keys)


@pytest.mark.timeout(1200)  # 300 queries, each run four ways, on a shared machine
def test_both_backends_find_what_the_brute_force_filter_finds(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    postgres = index_engine(pg_url)
    store(sqlite, MAILBOX)
    store(postgres, MAILBOX)
    seen = {"examples": 0, "nonempty": 0}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(queries)
    def check(query: str) -> None:
        want = expected(parse(query), MAILBOX)
        on_sqlite = _keys(sqlite, query)
        on_postgres = _keys(postgres, query)
        with monkeypatch.context() as many:  # the plans for text matching many messages
            many.setattr(compiler, "FEW_MATCHES", 0)
            assert _keys(sqlite, query) == on_sqlite, query
            assert _keys(postgres, query) == on_postgres, query
        assert on_sqlite == on_postgres, query
        assert on_sqlite == want, query
        seen["examples"] += 1
        seen["nonempty"] += 0 < len(want) < len(MAILBOX)

    check()
    # The queries were not all trivial: at least a third found some messages but not all.
    assert seen["examples"] >= 300 and seen["nonempty"] >= 100, seen


def test_sort_orders_agree_on_both_backends(pg_url: str, tmp_path: Path) -> None:
    sqlite = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    postgres = index_engine(pg_url)
    store(sqlite, MAILBOX)
    store(postgres, MAILBOX)
    for sort in (Sort.NEWEST, Sort.OLDEST):
        options = SearchOptions(sort=sort, limit=7, offset=3, timezone=TIMEZONE, now=NOW)
        orders = []
        for engine in (sqlite, postgres):
            with reading(engine) as conn:
                orders.append(
                    [(h.folder, h.uid) for h in search(conn, ACCOUNT, "is:read OR is:unread", options)]
                )
        by_date = sorted(
            MAILBOX, key=lambda s: (s.parsed.date or s.internal_date, s.uid), reverse=sort is Sort.NEWEST
        )
        assert orders[0] == orders[1] == [(s.folder, s.uid) for s in by_date[3:10]]


def test_relevance_pages_equal_the_full_ranking(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relevance page read from the best-scored matches first is the full ranking's page: with
    the fewest candidates (one per row), on pages where they suffice and where they do not."""
    sqlite = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    postgres = index_engine(pg_url)
    store(sqlite, MAILBOX)
    store(postgres, MAILBOX)
    monkeypatch.setattr(service, "CANDIDATES_PER_ROW", 1)
    statements: list[int | None] = []  # the candidates of each statement run (None: all matches)
    paged = service._paged

    def recording(*args: Any) -> Any:
        statements.append(args[-1])
        return paged(*args)

    monkeypatch.setattr(service, "_paged", recording)
    queries = [
        "invoice",
        "plan OR planning OR report",
        "invoice is:unread",
        "report OR is:flagged",
        "cafe -plan",
    ]
    for engine in (sqlite, postgres):
        with reading(engine) as conn:
            for query, (offset, limit) in itertools.product(queries, [(0, 1), (0, 3), (2, 4), (0, 60)]):
                options = SearchOptions(
                    sort=Sort.RELEVANCE, limit=limit, offset=offset, timezone=TIMEZONE, now=NOW
                )
                page = message_keys(conn, ACCOUNT, query, options)
                with monkeypatch.context() as full:
                    full.setattr(service, "_candidates", lambda prepared, options: None)
                    assert message_keys(conn, ACCOUNT, query, options) == page, (query, offset, limit)
    # Both ways ran: pages from the candidates alone, and pages that needed the full ranking.
    pages = sum(c is not None for c in statements)
    fallbacks = statements.count(None) - pages  # less the full rankings of the comparisons
    assert 0 < fallbacks < pages, statements
