"""A query tree as a SQLAlchemy condition on ``messages`` (and its folder), for either backend.

What differs between the backends (matching text, testing a flag, ranking) is behind ``Backend``;
the rest is written once here. Every value from the query is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Connection,
    FromClause,
    Select,
    and_,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    union_all,
)
from sqlalchemy.sql.elements import KeyedColumnElement

from emailops.search.query import (
    Account,
    AgeUnit,
    Ago,
    And,
    DatePoint,
    DateRange,
    Flag,
    Folder,
    HasAttachment,
    Is,
    MessageId,
    MimeType,
    Node,
    Not,
    Or,
    Size,
    Text,
    Thread,
)
from emailops.search.textmatch import AnyOf, TextExpr, text_expr
from emailops.store.schema import attachments, folders, messages, outbox
from emailops.store.search_terms import fold

IMAP_FLAGS = {
    Flag.READ: "\\seen",
    Flag.FLAGGED: "\\flagged",
    Flag.ANSWERED: "\\answered",
    Flag.DRAFT: "\\draft",
    Flag.DELETED: "\\deleted",
}


class Backend(Protocol):
    conn: Connection

    def matching_keys(self, expr: TextExpr) -> Select[Any]:
        """The keys of the messages whose terms match ``expr``, from the full-text index alone."""

    def text_match(
        self, message_id: KeyedColumnElement[Any], expr: TextExpr, by_key_below: int, every_match: bool
    ) -> ColumnElement[bool]:
        """Messages whose terms match ``expr``: looked up by key when fewer than ``by_key_below``
        messages match, else tested for each message on the walk of the date index.
        ``every_match``: the statement reads them all (a count), not a page to stop at."""

    def has_flag(self, flags: KeyedColumnElement[Any], flag: str) -> ColumnElement[bool]:
        """Whether the space-separated ``flags`` hold ``flag`` (lower case), in any case."""

    def one_of(self, value: KeyedColumnElement[Any], values: Select[Any]) -> ColumnElement[bool]:
        """Whether ``value`` is one of the single column that ``values`` selects."""

    def scope_key(self, folder_id: KeyedColumnElement[Any]) -> ColumnElement[Any]:
        """``folder_id`` as the account's restriction (``visible``) compares it."""


# Up to this many matches, a text match looks its messages up by key; more, and the plan walks
# the date index testing membership, which stops at the page's limit (measured: bench/README.md).
FEW_MATCHES = 2_000


def by_key_below(narrowing: int) -> int:
    """The matches under which a text is looked up by key, when ``narrowing`` other conditions
    stand beside it in an AND. Each makes the walk to the page's 50th hit deeper (a quarter of
    the messages passing it makes the walk 4x deeper, and the break-even count of matches,
    which grows with the square root of that depth, 2x higher), while the lookup by key costs
    no more: its cost is bounded by this count, the walk's only by the size of the index."""
    return FEW_MATCHES << min(narrowing, 2)  # doubled per condition, at most twice


@dataclass(frozen=True)
class Scope:
    """Who searches and when: the account (its folders' key and the names ``account:`` accepts),
    the time zone of dates, and now (for newer_than: and older_than:)."""

    account: str
    account_names: frozenset[str]
    timezone: tzinfo
    now: datetime


def message_date(m: FromClause) -> ColumnElement[Any]:
    """A message's date: its Date header, else when the server received it, else when it was
    indexed (never NULL, so both backends order alike and by the same index)."""
    return func.coalesce(m.c.date, m.c.internal_date, m.c.indexed_at)


def moment(point: DatePoint, scope: Scope) -> datetime:
    """A calendar day's midnight in the search's time zone, or ``Ago`` before now, in UTC."""
    if isinstance(point, Ago):
        return _ago(point, scope.now.astimezone(scope.timezone)).astimezone(UTC)
    local = datetime(point.year, point.month, point.day, tzinfo=scope.timezone)
    return local.astimezone(UTC)


_EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)  # an age reaching further back means "ever"
_HOURS = {AgeUnit.HOURS: 1, AgeUnit.DAYS: 24, AgeUnit.WEEKS: 24 * 7}


def _ago(ago: Ago, now: datetime) -> datetime:
    if ago.unit in _HOURS:
        back = timedelta(hours=ago.amount * _HOURS[ago.unit])
        return now - back if back < now - _EARLIEST else _EARLIEST
    months = ago.amount * (12 if ago.unit is AgeUnit.YEARS else 1)
    index = now.year * 12 + now.month - 1 - months
    if index < 1900 * 12:
        return _EARLIEST
    year, month = divmod(index, 12)
    day = min(now.day, _days_in_month(year, month + 1))
    return now.replace(year=year, month=month + 1, day=day)


def _days_in_month(year: int, month: int) -> int:
    following = date(year + month // 12, month % 12 + 1, 1)
    return (following - timedelta(days=1)).day


class Compiler:
    def __init__(self, backend: Backend, scope: Scope, every_match: bool = False) -> None:
        """``every_match``: the statement reads every match (counts, threads), not one page."""
        self.backend = backend
        self.scope = scope
        self.every_match = every_match

    def visible(self, m: FromClause) -> ColumnElement[bool]:
        """The messages a search may return: the account's, not expunged. (A subquery rather
        than a join, so that the plan can walk the date index and stop at the limit.)"""
        account_folders = select(folders.c.id).where(folders.c.account == self.scope.account)
        return and_(m.c.expunged_at.is_(None), self.backend.scope_key(m.c.folder_id).in_(account_folders))

    def hidden_keys(self) -> CompoundSelect[Any]:
        """The keys of every message ``visible`` leaves out, each once: the account's expunged
        messages and all of other accounts' (two index ranges; as one OR, SQLite scanned the table)."""
        mine = select(folders.c.id).where(folders.c.account == self.scope.account)
        others = select(folders.c.id).where(folders.c.account != self.scope.account)
        return union_all(
            select(messages.c.id).where(messages.c.expunged_at.is_not(None), messages.c.folder_id.in_(mine)),
            select(messages.c.id).where(messages.c.folder_id.in_(others)),
        )

    def condition(self, node: Node, m: FromClause) -> ColumnElement[bool]:
        text = text_expr(node)
        if text is not None:
            return self.backend.text_match(m.c.id, text, by_key_below(0), self.every_match)
        if isinstance(node, Not):
            return not_(self.condition(node.child, m))
        if isinstance(node, Or):
            return or_(*(self.condition(child, m) for child in node.children))
        if isinstance(node, And):
            return self._and(node, m)
        return self._leaf(node, m)

    def _and(self, node: And, m: FromClause) -> ColumnElement[bool]:
        # The text children become one match (one index lookup), the rest plain conditions.
        texts = [c for c in node.children if text_expr(c.child if isinstance(c, Not) else c)]
        grouped = text_expr(And(tuple(texts))) if texts else None
        rest = [c for c in node.children if grouped is None or c not in texts]
        parts = [self.condition(child, m) for child in rest]
        if grouped is not None:
            match = self.backend.text_match(m.c.id, grouped, by_key_below(len(rest)), self.every_match)
            parts.insert(0, match)
        return and_(*parts)

    def _leaf(self, node: Node, m: FromClause) -> ColumnElement[bool]:
        handlers: dict[type, Callable[[Any, FromClause], ColumnElement[bool]]] = {
            # Two-valued where a column may be NULL, so that NOT keeps the message.
            MessageId: lambda n, m: and_(m.c.message_id.is_not(None), m.c.message_id == n.value),
            Thread: self._thread,
            Folder: self._folder,
            Account: self._account,
            MimeType: self._mimetype,
            HasAttachment: lambda n, m: m.c.has_attachments.is_(True),
            Is: self._is,
            DateRange: self._dates,
            Size: self._size,
        }
        if isinstance(node, Text):  # reached only through text_expr
            raise AssertionError("text is matched by text_expr")
        return handlers[type(node)](node, m)

    def _thread(self, node: Thread, m: FromClause) -> ColumnElement[bool]:
        if node.query is None:
            return m.c.thread_key == node.key
        inner = messages.alias()
        keys = select(inner.c.thread_key).where(self.visible(inner), self.condition(node.query, inner))
        return self.backend.one_of(m.c.thread_key, keys)

    def _folder(self, node: Folder, m: FromClause) -> ColumnElement[bool]:
        # The folder's key is read first and compared as one value: the plan then walks that
        # folder's dates (ix_messages_folder_date) to the limit, where with IN (subquery) SQLite
        # read all the folder's messages and sorted them (bench/README.md "Search").
        named = select(folders.c.id).where(
            folders.c.account == self.scope.account, folders.c.name == node.name
        )
        key = self.backend.conn.execute(named).scalar_one_or_none()
        return false() if key is None else m.c.folder_id == key

    def _account(self, node: Account, m: FromClause) -> ColumnElement[bool]:
        names = sorted(fold(n) for n in self.scope.account_names) or [fold(self.scope.account)]
        return literal(fold(node.name)).in_(names)

    def _mimetype(self, node: MimeType, m: FromClause) -> ColumnElement[bool]:
        content_type = func.lower(attachments.c.content_type)
        if "/" in node.value:
            wanted = content_type == node.value
        else:
            prefix = node.value + "/"
            wanted = func.substr(content_type, 1, len(prefix)) == prefix
        return exists().where(attachments.c.message_pk == m.c.id, wanted)

    def _is(self, node: Is, m: FromClause) -> ColumnElement[bool]:
        if node.flag is Flag.UNREAD:
            return not_(self.backend.has_flag(m.c.flags, IMAP_FLAGS[Flag.READ]))
        if node.flag is Flag.REPLIED:
            return exists().where(outbox.c.message_pk == m.c.id, outbox.c.state == "sent")
        if node.flag is Flag.QUARANTINED:
            return m.c.rules_state == "quarantined"
        return self.backend.has_flag(m.c.flags, IMAP_FLAGS[node.flag])

    def _dates(self, node: DateRange, m: FromClause) -> ColumnElement[bool]:
        when = message_date(m)
        parts: list[ColumnElement[bool]] = [when.is_not(None)]
        if node.start is not None:
            parts.append(when >= moment(node.start, self.scope))
        if node.end is not None:
            parts.append(when < moment(node.end, self.scope))
        return and_(*parts)

    def _size(self, node: Size, m: FromClause) -> ColumnElement[bool]:
        if node.larger_than is not None:
            return m.c.size > node.larger_than
        return m.c.size < (node.smaller_than or 0)


def ranked_text(leaves: list[AnyOf]) -> AnyOf | None:
    """One expression of every positive text leaf, for relevance."""
    phrases = tuple(p for leaf in leaves for p in leaf.phrases)
    return AnyOf(phrases) if phrases else None
