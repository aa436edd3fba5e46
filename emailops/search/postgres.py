"""The PostgreSQL side: text matches as tsqueries on ``search_terms.vector`` (``to_tsvector``
with the ``simple`` configuration over the terms of ``terms.py``), flags with ``strpos``,
relevance by ``ts_rank`` of ``rank_vector`` (a message's first terms, ``fulltext.ranked_terms``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Text,
    any_,
    bindparam,
    column,
    func,
    literal,
    literal_column,
    select,
    table,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import BindParameter, KeyedColumnElement

from emailops.search.textmatch import AnyOf, Phrase, TextExpr

search_terms = table("search_terms", column("message_pk"), column("vector"), column("rank_vector"))
_SIMPLE: ColumnElement[Any] = literal_column("'simple'::regconfig")


def _phrase(phrase: Phrase) -> str:
    terms = [f"'{term}'" for term in phrase.terms]
    if phrase.prefix:
        terms[-1] += ":*"
    return "(" + " <-> ".join(terms) + ")"


def tsquery(expr: TextExpr) -> str:
    """tsquery text of ``expr``: quoted terms of ``[a-z0-9]`` joined by ``&``, ``|`` and ``!``."""
    if isinstance(expr, AnyOf):
        return "(" + " | ".join(_phrase(p) for p in expr.phrases) + ")"
    parts = [tsquery(e) for e in expr.required] + ["!" + tsquery(e) for e in expr.excluded]
    return "(" + " & ".join(parts) + ")"


def _query(expr: TextExpr) -> ColumnElement[Any]:
    return func.to_tsquery(_SIMPLE, literal(tsquery(expr)))


def _constant(value: object) -> BindParameter[Any]:
    """A constant of the code (never user input) written into the SQL text."""
    return literal(value, literal_execute=True)


class PostgresBackend:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @contextmanager
    def reading_all_matches(self) -> Iterator[None]:
        """For statements that read the matches of a text: through the GIN index, never by a scan
        of search_terms. The planner does not count reading each tsvector out of TOAST for ``@@``
        and scanned all 100,000 for a word in 11,000 (bench/README.md). Undone with the savepoint."""
        savepoint = self.conn.begin_nested()
        try:
            self.conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            yield
        finally:
            savepoint.rollback()

    def matching_keys(self, expr: TextExpr) -> Select[Any]:
        return select(search_terms.c.message_pk).where(search_terms.c.vector.op("@@")(_query(expr)))

    def text_match(
        self, message_id: KeyedColumnElement[Any], expr: TextExpr, by_key_below: int, every_match: bool
    ) -> ColumnElement[bool]:
        keys = self.matching_keys(expr)
        if every_match:
            # No page to stop at: the planner joins the matches by its statistics; the probe
            # below cost as much as the count (20 of 58 ms for folder:Archive linux).
            return message_id.in_(keys)
        probe = select(func.count()).select_from(keys.limit(by_key_below).subquery())
        with self.reading_all_matches():  # a scan read 12,000 tsvectors to find 2,000 of linux
            matches = self.conn.execute(probe).scalar_one()
        if matches < by_key_below:
            # "OFFSET 0" keeps the planner from merging it into a walk of the date index, which it
            # picks for rare words too, as its estimate for a tsquery is far off.
            return message_id.in_(keys.offset(0))
        return message_id.in_(keys)

    def has_flag(self, flags: KeyedColumnElement[Any], flag: str) -> ColumnElement[bool]:
        # In the SQL text, not bound: the partial indexes of migration 23 (unread, flagged) are
        # used only by statements that repeat their predicate, which a generic plan cannot prove.
        padded = _constant(" ").op("||")(func.lower(flags)).op("||")(_constant(" "))
        return func.strpos(padded, _constant(f" {flag} ")) > _constant(0)

    def one_of(self, value: KeyedColumnElement[Any], values: Select[Any]) -> ColumnElement[bool]:
        # Selected first and bound as one array: as a subquery, nested thread:{} queries became
        # nested loops, one level inside the other, on tables whose statistics were not yet
        # gathered (each level multiplied the work by the number of messages).
        found = [row[0] for row in self.conn.execute(values)]
        return value == any_(bindparam(None, found, type_=ARRAY(Text)))

    def scope_key(self, folder_id: KeyedColumnElement[Any]) -> ColumnElement[Any]:
        """The column itself: PostgreSQL plans with statistics (autovacuum's ANALYZE)."""
        return folder_id

    def scores(self, expr: AnyOf) -> Select[Any]:
        """(message_pk, score) of the messages matching ``expr``; a lower score ranks first. The
        score is of the message's first terms (``rank_vector``): the whole tsvector is read out of
        TOAST, and ranking 10,728 matches by it took 530-700 ms (bench/README.md)."""
        query = _query(expr)
        return select(
            search_terms.c.message_pk.label("message_pk"),
            (-func.ts_rank(search_terms.c.rank_vector, query)).label("score"),
        ).where(search_terms.c.vector.op("@@")(query))
