"""Each operator of the search language on both backends, over a few hand-written messages
indexed through the real path; the results views (sort, count, threads, snippets)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, event, update

from emailops.mime.parse import parse_message
from emailops.search import compiler
from emailops.search.query import Account
from emailops.search.service import (
    SearchOptions,
    Sort,
    count,
    message_keys,
    search,
    search_statement,
    threads,
)
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.content import message_content
from emailops.store.database import reading
from emailops.store.fulltext import RANKED_TERMS
from emailops.store.migrations import MIGRATIONS, migrate
from emailops.store.schema import messages, outbox
from tests.index_helpers import index_engine

ACCOUNT = "alice@example.com@imap.example.com"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _raw(headers: list[str], body: str, attachment: tuple[str, str] | None = None) -> bytes:
    if attachment is None:
        return ("\r\n".join([*headers, "Content-Type: text/plain; charset=utf-8", "", body])).encode()
    name, content_type = attachment
    return (
        "\r\n".join(
            [
                *headers,
                'Content-Type: multipart/mixed; boundary="b"',
                "",
                "--b",
                "Content-Type: text/plain; charset=utf-8",
                "",
                body,
                "--b",
                f'Content-Type: {content_type}; name="{name}"',
                f'Content-Disposition: attachment; filename="{name}"',
                "Content-Transfer-Encoding: base64",
                "",
                "aGVsbG8=",
                "--b--",
                "",
            ]
        )
    ).encode()


MESSAGES = {
    1: _raw(
        [
            'From: "Alice Smith" <alice@example.com>',
            "To: bob@corp.example.org",
            'Cc: "Carol Jones" <carol@example.net>',
            "Subject: Invoice 4711 for October",
            "Message-ID: <m1@example.com>",
            "Date: Thu, 05 Nov 2026 10:00:00 +0000",
        ],
        "Please pay the invoice soon. Grüße aus Zürich, the quarterly numbers follow.",
        ("Invoice-4711.pdf", "application/pdf"),
    ),
    2: _raw(
        [
            "From: bob@corp.example.org",
            "To: Alice Smith <alice@example.com>",
            "Subject: Re: Invoice 4711 for October",
            "Message-ID: <m2@corp.example.org>",
            "In-Reply-To: <m1@example.com>",
            "References: <m1@example.com>",
            "Date: Fri, 20 Nov 2026 09:00:00 +0000",
        ],
        "Paid today. WhatsApp外贸客户开发\uff0c势在必行",
    ),
    3: _raw(
        [
            'From: "外贸 News" <news@cn.example>',
            "To: alice@example.com",
            "Subject: 外贸客户开发\uff0c势在必行",
            "Message-ID: <m3@cn.example>",
            "Date: Thu, 01 Oct 2026 23:30:00 -0200",
        ],
        "日本語のテスト 한국어 뉴스 " + "filler " * 4000,
        ("photo.JPG", "image/jpeg"),
    ),
    4: _raw(
        ['From: "Dave" <dave@example.com>', "To: alice@example.com", "Subject: quarterly report draft"],
        "No date and no Message-ID here. CRÈME brûlée",
    ),
}
FLAGS = {1: ("\\Seen",), 2: ("\\Seen", "\\Flagged", "\\Answered"), 3: (), 4: ("\\Draft", "\\Deleted")}
INTERNAL = datetime(2026, 6, 15, 8, 0, tzinfo=UTC)


@pytest.fixture
def engine(db_url: str) -> Engine:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        inbox = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        archive = folder_store.ensure_folder(conn, ACCOUNT, "Archive")
        for uid, raw in MESSAGES.items():
            item = message_store.FetchedMessage(
                uid, FLAGS[uid], INTERNAL, None, message_content(parse_message(raw))
            )
            folder = archive if uid == 4 else inbox
            (pk,) = message_store.insert_messages(
                conn, folder.id, 9, [item], baseline_uidnext=None, now=NOW
            ).values()
            if uid == 4:
                conn.execute(update(messages).where(messages.c.id == pk).values(rules_state="quarantined"))
                conn.execute(
                    outbox.insert().values(
                        account=ACCOUNT,
                        inbound_key="k4",
                        message_pk=pk,
                        rule_name="r",
                        state="sent",
                        recipient="dave@example.com",
                        reply_message_id="<r4@x>",
                        raw=b"",
                        created_at=NOW,
                        updated_at=NOW,
                    )
                )
        other = folder_store.ensure_folder(conn, "someone-else", "INBOX")
        copy = message_store.FetchedMessage(
            1, (), INTERNAL, None, message_content(parse_message(MESSAGES[1]))
        )
        message_store.insert_messages(conn, other.id, 9, [copy], baseline_uidnext=None, now=NOW)
    return engine


def uids(engine: Engine, query: str, **options: object) -> list[int]:
    settings = SearchOptions(limit=100, now=NOW, account_names=frozenset({"alice@example.com", ACCOUNT}))
    settings = SearchOptions(**{**settings.__dict__, **options})  # type: ignore[arg-type]
    with reading(engine) as conn:
        return sorted(uid for _, _, uid in message_keys(conn, ACCOUNT, query, settings))


CASES = {
    # free text, phrases, prefixes, booleans
    "invoice": [1, 2],
    "INVOICE 4711": [1, 2],
    '"pay the invoice"': [1],
    '"invoice pay"': [],
    "invo*": [1, 2],
    "quarter*": [1, 4],
    "invoice -paid": [1],
    "invoice NOT paid": [1],
    "paid OR brûlée": [2, 4],
    "invoice AND paid": [2],
    "(paid OR creme) report": [4],
    "-invoice": [3, 4],
    # case and accents folded
    "zurich": [1],
    "GRUSSE": [1],
    "crème": [4],
    # address operators: whole address, local part, domain, display name words
    "from:alice@example.com": [1],
    "from:ALICE@Example.COM": [1],
    "from:alice": [1],
    "from:example.com": [1, 4],
    "from:smith": [1],
    'from:"Alice Smith"': [1],
    "from:ali*": [1],
    "from:外贸": [3],
    "to:bob@corp.example.org": [1],
    "to:alice": [2, 3, 4],
    "cc:carol": [1],
    "cc:example.net": [1],
    "cc:bob": [],
    "recipient:carol": [1],
    "recipient:corp.example.org": [1],
    "from:corp": [],
    # fields
    "subject:invoice": [1, 2],
    "subject:paid": [],
    "body:paid": [2],
    'body:"pay the invoice"': [1],
    "attachment:invoice": [1],
    "attachment:jpg": [3],
    "attachment:pdf*": [1],
    "mimetype:application/pdf": [1],
    "mimetype:image": [3],
    "mimetype:image/*": [3],
    "mimetype:IMAGE/JPEG": [3],
    "mimetype:video": [],
    "has:attachment": [1, 3],
    # identity and threads
    "id:<m1@example.com>": [1],
    "id:m2@corp.example.org": [2],
    "thread:<m1@example.com>": [1, 2],
    "thread:{paid}": [1, 2],
    "thread:{from:news@cn.example}": [3],
    "-thread:{paid}": [3, 4],
    # folders, account, flags, states
    "folder:INBOX": [1, 2, 3],
    "folder:inbox": [1, 2, 3],
    "folder:Archive": [4],
    "account:alice@example.com": [1, 2, 3, 4],
    "account:bob@example.com": [],
    "is:unread": [3, 4],
    "is:read": [1, 2],
    "is:flagged": [2],
    "is:answered": [2],
    "is:draft": [4],
    "is:deleted": [4],
    "is:replied": [4],
    "is:quarantined": [4],
    # dates (UTC here), the internal date where a message has no Date
    "date:2026-11": [1, 2],
    "date:2026-11-05": [1],
    "date:2026-11-01..2026-11-19": [1],
    "date:2026-11-06..": [2],
    "date:..2026-10": [3, 4],
    "date:2026-10-02": [3],
    "date:2026-06": [4],
    "after:2026-11-20": [2],
    "before:2026-11-05": [3, 4],
    "newer_than:14d": [2],
    "newer_than:1m": [1, 2],
    "older_than:1m": [3, 4],
    "older_than:1y": [],
    "newer_than:48h": [],
    # sizes
    "larger:20k": [3],
    "smaller:20k": [1, 2, 4],
    # CJK: any sub-run of two or more characters, and text touching CJK
    "外贸": [2, 3],
    "客户开发": [2, 3],
    "势在": [2, 3],
    "贸客": [2, 3],
    "外": [2, 3],
    "发": [2, 3],
    "WhatsApp": [2],
    "whatsapp外贸": [2],
    "subject:外贸": [3],
    "日本": [3],
    "のテ": [3],
    "한국": [3],
    "외국": [],
    "外贸势在": [],
}


def test_each_operator(engine: Engine) -> None:
    failures = {
        query: (uids(engine, query), want) for query, want in CASES.items() if uids(engine, query) != want
    }
    assert failures == {}


def test_search_timezone_moves_day_boundaries(engine: Engine) -> None:
    # Message 3 is 2026-10-02 01:30 UTC: still 1 October in São Paulo (UTC-3).
    assert uids(engine, "date:2026-10-01") == []
    assert uids(engine, "date:2026-10-01", timezone=ZoneInfo("America/Sao_Paulo")) == [3]
    assert uids(engine, "after:2026-10-02", timezone=ZoneInfo("America/Sao_Paulo")) == [1, 2]


def test_sort_limit_offset_count(engine: Engine) -> None:
    options = SearchOptions(limit=2, now=NOW)
    with reading(engine) as conn:
        assert [h.uid for h in search(conn, ACCOUNT, "-is:draft", options)] == [2, 1]
        assert [h.uid for h in search(conn, ACCOUNT, "-is:draft", SearchOptions(limit=2, offset=1))] == [1, 3]
        assert [h.uid for h in search(conn, ACCOUNT, "-is:draft", SearchOptions(sort=Sort.OLDEST))] == [
            3,
            1,
            2,
        ]
        # Relevance: the message that says invoice most, in subject and body, first.
        ranked = search(conn, ACCOUNT, "invoice OR paid", SearchOptions(sort=Sort.RELEVANCE))
        assert {h.uid for h in ranked} == {1, 2}
        assert count(conn, ACCOUNT, "is:read OR is:unread", options) == 4
        assert count(conn, ACCOUNT, "zebra", options) == 0


@contextlib.contextmanager
def _recorded(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The (statement, parameters) ``engine`` executes inside the block, in order."""
    executed: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        executed.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield executed
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize(("flag", "found"), [("unread", 2), ("flagged", 1)])
def test_flag_counts_read_the_partial_index(engine: Engine, flag: str, found: int) -> None:
    """``--count is:unread`` and ``is:flagged`` read the partial index of such messages (the
    flag test in the statement equals the index's predicate), not every message's entry."""
    with reading(engine) as conn:
        with _recorded(engine) as executed:
            assert count(conn, ACCOUNT, f"is:{flag}", SearchOptions(now=NOW)) == found
        statement, parameters = executed[-1]
        explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")  # five rows: a scan is cheaper
        plan = " ".join(str(row) for row in conn.exec_driver_sql(explain + statement, parameters))
    assert f"ix_messages_{flag}" in plan, plan


def test_counts_of_text_with_filters_read_the_matches_by_the_full_text_index(engine: Engine) -> None:
    """On PostgreSQL a count of text beside other terms runs with sequential scans off: the
    planner scanned every tsvector out of TOAST for folder:Archive linux (bench/README.md)."""
    with _recorded(engine) as recorded, reading(engine) as conn:
        assert count(conn, ACCOUNT, "invoice folder:INBOX", SearchOptions(now=NOW)) == 2
    executed = [statement for statement, _ in recorded]
    counted = next(
        i for i, sql in enumerate(executed) if sql.startswith("SELECT count(*) AS count_1 \nFROM messages")
    )
    settings = [sql for sql in executed[:counted] if "enable_seqscan" in sql]
    # PostgreSQL: the count's own, and no probe of how many match (the count reads them all).
    # SQLite probes, to look a rare word's matches up by key.
    assert len(settings) == (0 if engine.dialect.name == "sqlite" else 1), executed
    assert any("LIMIT" in sql for sql in executed) is (engine.dialect.name == "sqlite"), executed


def _late_and_early_zebras(pg_url: str) -> Engine:
    """A PostgreSQL index of two messages: zebra once in a subject (uid 1), 50 times past the
    first ``RANKED_TERMS`` terms (uid 2)."""
    engine = index_engine(pg_url)
    late = "filler " * RANKED_TERMS + "zebra " * 50
    with engine.begin() as conn:
        inbox = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        raws = [
            _raw(["From: a@example.com", "Subject: zebra sightings"], "Nothing else."),
            _raw(["From: b@example.com", "Subject: notes"], late),
        ]
        items = [
            message_store.FetchedMessage(uid, (), INTERNAL, None, message_content(parse_message(raw)))
            for uid, raw in enumerate(raws, start=1)
        ]
        message_store.insert_messages(conn, inbox.id, 9, items, baseline_uidnext=None, now=NOW)
    return engine


def _relevance_uids(engine: Engine, query: str) -> list[int]:
    with reading(engine) as conn:
        return [hit.uid for hit in search(conn, ACCOUNT, query, SearchOptions(sort=Sort.RELEVANCE, now=NOW))]


@pytest.mark.postgres
def test_postgresql_ranks_by_the_first_terms(pg_url: str) -> None:
    """Relevance on PostgreSQL scores a message's first terms (subject, addresses, start of the
    body): a word said once in a subject outranks the same word said 50 times past them; both
    are found."""
    engine = _late_and_early_zebras(pg_url)
    assert _relevance_uids(engine, "zebra") == [1, 2]


@pytest.mark.postgres
def test_migration_23_computes_the_ranking_terms_of_stored_messages(pg_url: str) -> None:
    engine = _late_and_early_zebras(pg_url)
    with engine.begin() as conn:  # back to schema version 19
        conn.exec_driver_sql("DELETE FROM schema_migrations WHERE version >= 23")
        conn.exec_driver_sql("ALTER TABLE search_terms DROP COLUMN rank_vector")
    assert [m.version for m in migrate(engine)] == [m.version for m in MIGRATIONS if m.version >= 23]
    assert _relevance_uids(engine, "zebra") == [1, 2]
    with reading(engine) as conn:
        sizes = conn.exec_driver_sql("SELECT length(rank_vector) FROM search_terms").scalars().all()
    assert len(sizes) == 2 and all(size > 0 for size in sizes)


def test_threads_view(engine: Engine) -> None:
    with reading(engine) as conn:
        found = threads(conn, ACCOUNT, "invoice OR 外贸", SearchOptions())
    assert [(t.thread_key, t.messages, t.subject) for t in found] == [
        ("<m1@example.com>", 2, "Re: Invoice 4711 for October"),
        ("<m3@cn.example>", 1, "外贸客户开发\uff0c势在必行"),
    ]
    assert found[0].newest == datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def test_snippets_mark_the_matched_words(engine: Engine) -> None:
    with reading(engine) as conn:
        (hit,) = search(conn, ACCOUNT, "pay* zürich -paid", SearchOptions())
        (cjk,) = search(conn, ACCOUNT, "body:外贸", SearchOptions())
    assert (
        hit.snippet.marked()
        == "Please [pay] the invoice soon. Grüße aus [Zürich], the quarterly numbers follow."
    )
    assert [hit.snippet.text[a:b] for a, b in hit.snippet.marks] == ["pay", "Zürich"]
    assert "WhatsApp[外贸]客户开发" in cjk.snippet.marked()
    # Words of other fields matched there, not in the body the snippet is of.
    with reading(engine) as conn:
        (fielded,) = search(conn, ACCOUNT, "subject:invoice pay", SearchOptions())
    assert [fielded.snippet.text[a:b] for a, b in fielded.snippet.marks] == ["pay"]


def test_nested_thread_queries_are_not_nested_scans_on_postgresql(engine: Engine) -> None:
    # As subqueries, thread:{} inside thread:{} became loops over the messages nested one level
    # in the other on PostgreSQL (minutes for 60 messages before ANALYZE); there each level's
    # thread keys are selected first and bound as one array.
    query = "thread:{thread:{thread:{thread:{paid}}}}"
    assert uids(engine, query) == uids(engine, "thread:{paid}") == [1, 2]
    with reading(engine) as conn:
        statement = search_statement(conn, ACCOUNT, query, SearchOptions(now=NOW))
        sql = str(statement.compile(dialect=conn.dialect))
    scans_of_messages = sql.count("FROM messages")
    assert scans_of_messages == (1 if engine.dialect.name == "postgresql" else 5), sql


def test_newest_first_on_sqlite_walks_a_date_index_to_the_limit(tmp_path: Path) -> None:
    """The daemon's SQLite index has no statistics: the account's restriction must not lead the
    planner to look the account's messages up by folder and sort them all (0.2-0.9 s on 100,000
    messages, bench/README.md "Console")."""
    engine = index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        items = [
            message_store.FetchedMessage(uid, (), INTERNAL, None, message_content(parse_message(raw)))
            for uid, raw in MESSAGES.items()
        ]
        message_store.insert_messages(conn, folder.id, 9, items, baseline_uidnext=None, now=NOW)
    with reading(engine) as conn:
        walks = {"has:attachment": "search_date", "is:unread": "search_date", "folder:INBOX": "folder_date"}
        for query, index in [*walks.items(), (Account(ACCOUNT), "search_date")]:
            statement = search_statement(
                conn, ACCOUNT, query, SearchOptions(sort=Sort.NEWEST, limit=50, now=NOW)
            )
            compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
            parameters = tuple(compiled.params[name] for name in compiled.positiontup or ())
            plan = [
                row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), parameters)
            ]
            assert any(f"ix_messages_{index}" in step for step in plan), (query, plan)
            assert not any("ORDER BY" in step for step in plan), (query, plan)  # no sort of the matches


def test_a_text_beside_other_conditions_is_looked_up_by_key_up_to_more_matches(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each condition beside a text deepens the walk of the date index to the page's last hit,
    so the text is looked up by key up to twice as many matches per condition (up to two)."""
    monkeypatch.setattr(compiler, "FEW_MATCHES", 2)  # "invoice" matches two messages

    def by_key(query: str) -> bool:
        with reading(engine) as conn:
            sql = str(search_statement(conn, ACCOUNT, query, SearchOptions(now=NOW)))
        if engine.dialect.name == "postgresql":
            return sql.count("OFFSET") == 2  # the page's, and the matches' own "OFFSET 0"
        return "messages.id +" not in sql

    assert not by_key("invoice")
    assert by_key("invoice is:unread")
    assert by_key("invoice -has:attachment folder:INBOX")
    assert [compiler.by_key_below(n) for n in range(4)] == [2, 4, 8, 8]

    def found(query: str) -> list[int]:
        with reading(engine) as conn:
            return [hit.uid for hit in search(conn, ACCOUNT, query, SearchOptions(now=NOW))]

    looked_up = found("invoice is:read")
    monkeypatch.setattr(compiler, "FEW_MATCHES", 0)  # the walk of the date index
    assert not by_key("invoice is:read")
    assert found("invoice is:read") == looked_up != []


def test_a_ranked_search_scores_every_match_without_a_probe_on_postgresql(engine: Engine) -> None:
    """By relevance every match is scored before the page is cut, so PostgreSQL does not first
    count up to a few thousand matches to plan a walk (15 of 82 ms for money, bench/README.md)."""
    with _recorded(engine) as executed, reading(engine) as conn:
        ranked = search(conn, ACCOUNT, "invoice folder:INBOX", SearchOptions(sort=Sort.RELEVANCE))
    assert {hit.uid for hit in ranked} == {1, 2}
    probes = [sql for sql, _ in executed if sql.startswith("SELECT count(*)")]
    assert len(probes) == (1 if engine.dialect.name == "sqlite" else 0), executed
