"""The SQLite side: text matches as FTS5 queries on ``search_fts`` (one column of terms, the
``ascii`` tokenizer; see ``terms.py``), flags with ``instr``, relevance by ``bm25``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    column,
    func,
    literal,
    literal_column,
    or_,
    select,
    table,
)
from sqlalchemy.sql.elements import KeyedColumnElement

from emailops.search.textmatch import AnyOf, Phrase, TextExpr

search_fts = table("search_fts", column("rowid"), column("terms"))


def _phrase(phrase: Phrase) -> str:
    return '"' + " ".join(phrase.terms) + '"' + ("*" if phrase.prefix else "")


def fts5_query(expr: TextExpr) -> str:
    """FTS5 query text of ``expr``: quoted terms of ``[a-z0-9]`` joined by AND, OR and NOT."""
    if isinstance(expr, AnyOf):
        return "(" + " OR ".join(_phrase(p) for p in expr.phrases) + ")"
    query = "(" + " AND ".join(fts5_query(e) for e in expr.required) + ")"
    for excluded in expr.excluded:
        query = f"({query} NOT {fts5_query(excluded)})"
    return query


def _matching(expr: TextExpr) -> ColumnElement[bool]:
    return literal_column("search_fts").op("MATCH")(literal(fts5_query(expr)))


class SqliteBackend:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @contextmanager
    def reading_all_matches(self) -> Iterator[None]:
        """(PostgreSQL's planner needs a hint for such statements; SQLite's reads FTS5 alone.)"""
        yield

    def matching_keys(self, expr: TextExpr) -> Select[Any]:
        return select(search_fts.c.rowid).where(_matching(expr))

    def text_match(
        self, message_id: KeyedColumnElement[Any], expr: TextExpr, by_key_below: int, every_match: bool
    ) -> ColumnElement[bool]:
        # A count chooses the same way: by key for a rare word, else the walk of an index.
        rowids = self.matching_keys(expr)
        probe = select(func.count()).select_from(rowids.limit(by_key_below).subquery())
        if self.conn.execute(probe).scalar_one() < by_key_below:
            return message_id.in_(rowids)
        return (message_id + 0).in_(rowids)  # "+ 0": not by key, so by the date index

    def has_flag(self, flags: KeyedColumnElement[Any], flag: str) -> ColumnElement[bool]:
        # The flag as a whole word, by LIKE (case-insensitive for ASCII, as lower()), which builds
        # no string per row: instr(' ' || lower(flags) || ' ', ...) cost twice as much (bench/README.md).
        # The patterns are in the SQL text, not bound, as in the partial indexes of migration 23
        # (unread, flagged), which SQLite uses only for a query repeating their predicate.
        patterns = (flag, flag + " %", "% " + flag, "% " + flag + " %")
        return or_(*(flags.like(literal(pattern, literal_execute=True)) for pattern in patterns))

    def one_of(self, value: KeyedColumnElement[Any], values: Select[Any]) -> ColumnElement[bool]:
        # SQLite runs an uncorrelated IN subquery once, into a temporary index.
        return value.in_(values.scalar_subquery())

    def scope_key(self, folder_id: KeyedColumnElement[Any]) -> ColumnElement[Any]:
        """An expression, which no index serves: without statistics (the daemon runs no ANALYZE)
        SQLite looked the account's messages up by folder and sorted them all, 0.2-0.9 s on
        100,000, instead of walking the date index to the limit (bench/README.md "Console")."""
        return folder_id + 0

    def scores(self, expr: AnyOf) -> Select[Any]:
        """(message_pk, score) of the messages matching ``expr``; a lower score ranks first."""
        return select(
            search_fts.c.rowid.label("message_pk"),
            func.bm25(literal_column("search_fts")).label("score"),
        ).where(_matching(expr))
