"""Search entry points for the CLI and the console: plain functions of a connection, the
account, the query text and ``SearchOptions``. They raise ``QueryError`` for a query that cannot
be parsed, before any SQL runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, CompoundSelect, Connection, Select, func, select

from emailops.search.compiler import Compiler, Scope, message_date, ranked_text
from emailops.search.postgres import PostgresBackend
from emailops.search.query import And, Node, Not, Or, Text, parse
from emailops.search.results import Hit, ThreadHit, snippet
from emailops.search.sqlite import SqliteBackend
from emailops.search.textmatch import TextExpr, positive_text, text_expr
from emailops.store.schema import folders, messages


class Sort(StrEnum):
    NEWEST = "newest"
    OLDEST = "oldest"
    RELEVANCE = "relevance"


@dataclass(frozen=True)
class SearchOptions:
    sort: Sort = Sort.NEWEST
    limit: int = 50
    offset: int = 0
    timezone: tzinfo = UTC  # of date:, after:, before: (SEARCH_TIMEZONE)
    now: datetime | None = None  # for newer_than: and older_than:; the clock when None
    # What account: accepts (the account's user name); the account's key when empty.
    account_names: frozenset[str] = field(default_factory=frozenset)


def _backend(conn: Connection) -> SqliteBackend | PostgresBackend:
    return SqliteBackend(conn) if conn.dialect.name == "sqlite" else PostgresBackend(conn)


@dataclass(frozen=True)
class _Prepared:
    node: Node
    backend: SqliteBackend | PostgresBackend
    where: ColumnElement[bool]


def _scope(account: str, options: SearchOptions) -> Scope:
    return Scope(account, options.account_names, options.timezone, options.now or datetime.now(UTC))


def _prepare(
    conn: Connection, account: str, query: str | Node, options: SearchOptions, every_match: bool = False
) -> _Prepared:
    node = parse(query) if isinstance(query, str) else query
    backend = _backend(conn)
    # Ranked by relevance, every match is scored before the page is cut: no walk to plan for.
    every_match = every_match or options.sort is Sort.RELEVANCE
    compiler = Compiler(backend, _scope(account, options), every_match)
    where = compiler.visible(messages)
    return _Prepared(node, backend, where & compiler.condition(node, messages))


# Relevance reads first the matches scored at least as well as the (this many x offset + limit)th
# best match; only when they do not fill the page, all of them (exact either way: see _page).
CANDIDATES_PER_ROW = 4


def _ordered(
    prepared: _Prepared, statement: Select[Any], sort: Sort, candidates: int | None = None
) -> Select[Any]:
    when = message_date(messages)
    newest = (when.desc(), messages.c.id.desc())
    if sort is Sort.OLDEST:
        return statement.order_by(when.asc(), messages.c.id.asc())
    ranked = ranked_text(positive_text(prepared.node)) if sort is Sort.RELEVANCE else None
    if ranked is None:
        return statement.order_by(*newest)
    scores = prepared.backend.scores(ranked).cte("scores")
    if candidates is None:
        joined = statement.outerjoin(scores, scores.c.message_pk == messages.c.id)
        return joined.order_by(scores.c.score.is_(None), scores.c.score, *newest)
    # Scored once (the CTE is read twice): the cut, then the join of the matches within it.
    scores = scores.prefix_with("MATERIALIZED")
    cut = select(scores.c.score).order_by(scores.c.score).limit(1).offset(candidates - 1)
    joined = statement.join(scores, scores.c.message_pk == messages.c.id)
    return joined.where(scores.c.score <= cut.scalar_subquery()).order_by(scores.c.score, *newest)


def _candidates(prepared: _Prepared, options: SearchOptions) -> int | None:
    """How many of the best-scored matches a relevance search reads first (None: not ranked)."""
    if options.sort is not Sort.RELEVANCE or ranked_text(positive_text(prepared.node)) is None:
        return None
    return CANDIDATES_PER_ROW * (options.offset + options.limit)


def _page(conn: Connection, prepared: _Prepared, statement: Select[Any], options: SearchOptions) -> list[Any]:
    """One page of ``statement`` in ``options.sort`` order. By relevance, from the best-scored
    matches first: every other message scores worse or has no score and ranks after all of them,
    so when they fill the page it is the page of the full ranking; else the full ranking is read."""
    candidates = _candidates(prepared, options)
    if candidates is None:
        return list(conn.execute(_paged(prepared, statement, options, None)).all())
    with prepared.backend.reading_all_matches():
        rows = list(conn.execute(_paged(prepared, statement, options, candidates)).all())
        if len(rows) == options.limit:
            return rows
        return list(conn.execute(_paged(prepared, statement, options, None)).all())


def _paged(
    prepared: _Prepared, statement: Select[Any], options: SearchOptions, candidates: int | None
) -> Select[Any]:
    ordered = _ordered(prepared, statement.where(prepared.where), options.sort, candidates)
    return ordered.limit(options.limit).offset(options.offset)


def search(conn: Connection, account: str, query: str | Node, options: SearchOptions) -> list[Hit]:
    """The messages of ``account`` (not expunged) matching ``query``, in ``options.sort`` order."""
    prepared = _prepare(conn, account, query, options)
    rows = _page(conn, prepared, _hit_columns(), options)
    return [
        Hit(
            message_pk=row[0],
            folder=row[1],
            uidvalidity=row[2],
            uid=row[3],
            message_id=row[4],
            sender=f"{row[6]} <{row[5]}>" if row[6] else row[5],
            subject=row[7],
            date=_as_datetime(row[8]),
            thread_key=row[9],
            snippet=snippet(row[10] or "", prepared.node),
        )
        for row in rows
    ]


def search_statement(
    conn: Connection, account: str, query: str | Node, options: SearchOptions
) -> Select[Any]:
    """The (first) statement ``search`` runs (for EXPLAIN)."""
    prepared = _prepare(conn, account, query, options)
    return _paged(prepared, _hit_columns(), options, _candidates(prepared, options))


def _hit_columns() -> Select[Any]:
    return select(
        messages.c.id,
        folders.c.name,
        messages.c.uidvalidity,
        messages.c.uid,
        messages.c.message_id,
        messages.c.from_addr,
        messages.c.from_name,
        messages.c.subject,
        message_date(messages),
        messages.c.thread_key,
        func.substr(messages.c.body_text, 1, 20_000),
    ).select_from(messages.join(folders, messages.c.folder_id == folders.c.id))


def message_keys(
    conn: Connection, account: str, query: str | Node, options: SearchOptions
) -> list[tuple[str, int, int]]:
    """(folder, UIDVALIDITY, UID) of what ``search`` finds, in the same order, without reading
    the messages' text (``--output ids``)."""
    prepared = _prepare(conn, account, query, options)
    statement = select(folders.c.name, messages.c.uidvalidity, messages.c.uid).select_from(
        messages.join(folders, messages.c.folder_id == folders.c.id)
    )
    rows = _page(conn, prepared, statement, options)
    return [(str(row[0]), int(row[1]), int(row[2])) for row in rows]


def count(conn: Connection, account: str, query: str | Node, options: SearchOptions) -> int:
    """How many messages ``search`` would find without a limit."""
    node = parse(query) if isinstance(query, str) else query
    text = text_expr(node)
    if text is not None:
        return _text_count(conn, account, node, text, options)
    prepared = _prepare(conn, account, node, options, every_match=True)
    if not _matches_text(node):
        return _count_rows(conn, prepared.where)
    # PostgreSQL scanned all 100,000 tsvectors for folder:Archive linux (1.4 s; bench/README.md).
    with prepared.backend.reading_all_matches():
        return _count_rows(conn, prepared.where)


def _matches_text(node: Node) -> bool:
    """Whether ``node`` reads a text's matches (not counting thread:{}, whose keys are read first)."""
    if isinstance(node, Text):
        return True
    if isinstance(node, Not):
        return _matches_text(node.child)
    if isinstance(node, (And, Or)):
        return any(_matches_text(child) for child in node.children)
    return False


def _count_rows(conn: Connection, where: ColumnElement[bool]) -> int:
    return int(conn.execute(select(func.count()).select_from(messages).where(where)).scalar_one())


def _count_of(conn: Connection, keys: Select[Any] | CompoundSelect[Any]) -> int:
    return int(conn.execute(select(func.count()).select_from(keys.subquery())).scalar_one())


def _text_count(conn: Connection, account: str, node: Node, text: TextExpr, options: SearchOptions) -> int:
    """A query of text alone: the full-text index counts the matches, less those of the messages a
    search does not see, when there are fewer of those than matches (else the visible matches
    are counted one by one, reading each match's row: 16,000 rows of ``linux`` took 81 ms)."""
    backend = _backend(conn)
    compiler = Compiler(backend, _scope(account, options), every_match=True)
    matching = backend.matching_keys(text)
    with backend.reading_all_matches():
        total = _count_of(conn, matching)
        hidden = compiler.hidden_keys().subquery()
        few_hidden = _count_of(conn, select(hidden.c.id).limit(total))
        if few_hidden == 0:
            return total
        if few_hidden == total:
            return _count_rows(conn, compiler.visible(messages) & compiler.condition(node, messages))
        return total - _count_of(conn, select(hidden.c.id).where(hidden.c.id.in_(matching)))


def threads(conn: Connection, account: str, query: str | Node, options: SearchOptions) -> list[ThreadHit]:
    """The threads of the matching messages, newest first (or oldest first with ``Sort.OLDEST``;
    relevance sorts threads newest first), each with how many of its messages match."""
    prepared = _prepare(conn, account, query, options, every_match=True)  # grouped: all are read
    when = message_date(messages)
    newest = func.max(when)
    order = (
        (newest.asc(), messages.c.thread_key)
        if options.sort is Sort.OLDEST
        else (newest.desc(), messages.c.thread_key)
    )
    grouped = (
        select(messages.c.thread_key, func.count(), newest)
        .select_from(messages)
        .where(prepared.where)
        .group_by(messages.c.thread_key)
        .order_by(*order)
        .limit(options.limit)
        .offset(options.offset)
    )
    page = conn.execute(grouped).all()
    subjects: dict[str, str] = {}
    if page:
        latest = (
            select(messages.c.thread_key, messages.c.subject)
            .select_from(messages)
            .where(prepared.where, messages.c.thread_key.in_([row[0] for row in page]))
            .order_by(when.desc(), messages.c.id.desc())
        )
        for key, subject in conn.execute(latest):
            subjects.setdefault(key, subject)
    return [ThreadHit(key, int(n), _as_datetime(moment), subjects.get(key, "")) for key, n, moment in page]


def _as_datetime(value: object) -> datetime | None:
    """Dates are stored in UTC; SQLite hands them back as naive ISO strings."""
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
