"""The search language parsed into a tree (see README "Search"). Parsing never touches a database;
``QueryError`` says where the query went wrong and what was expected there.

Precedence: ``NOT``/``-`` binds tightest, then ``AND`` (also implied between terms), then ``OR``.
"""

from __future__ import annotations

import calendar
import difflib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from emailops.store.search_terms import tokens

MAX_QUERY_CHARS = 10_000
MAX_DEPTH = 32


class QueryError(ValueError):
    """A query that cannot be parsed: ``position`` is 1-based, counted in characters."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(f"at character {position}: {message}")
        self.position = position


class TextField(StrEnum):
    ANY = "any"
    SUBJECT = "subject"
    BODY = "body"
    ATTACHMENT = "attachment"
    FROM = "from"
    TO = "to"
    CC = "cc"
    RECIPIENT = "recipient"


class Flag(StrEnum):
    UNREAD = "unread"
    READ = "read"
    FLAGGED = "flagged"
    ANSWERED = "answered"
    DRAFT = "draft"
    DELETED = "deleted"
    REPLIED = "replied"
    QUARANTINED = "quarantined"


class AgeUnit(StrEnum):
    HOURS = "h"
    DAYS = "d"
    WEEKS = "w"
    MONTHS = "m"
    YEARS = "y"


@dataclass(frozen=True)
class Ago:
    """A moment relative to now: ``amount`` units before it."""

    amount: int
    unit: AgeUnit


DatePoint = date | Ago  # a calendar day (midnight in the search's time zone) or a moment ago


@dataclass(frozen=True)
class Text:
    field: TextField
    value: str  # as written, without quotes or the trailing "*"
    phrase: bool
    prefix: bool


@dataclass(frozen=True)
class MessageId:
    value: str  # normalised to "<...>"


@dataclass(frozen=True)
class Thread:
    key: str | None
    query: Node | None  # thread:{QUERY}


@dataclass(frozen=True)
class Folder:
    name: str


@dataclass(frozen=True)
class Account:
    name: str


@dataclass(frozen=True)
class MimeType:
    value: str  # folded; "image" or "image/*" match every image type


@dataclass(frozen=True)
class HasAttachment:
    pass


@dataclass(frozen=True)
class Is:
    flag: Flag


@dataclass(frozen=True)
class DateRange:
    start: DatePoint | None  # inclusive
    end: DatePoint | None  # exclusive


@dataclass(frozen=True)
class Size:
    larger_than: int | None
    smaller_than: int | None


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


Leaf = Text | MessageId | Thread | Folder | Account | MimeType | HasAttachment | Is | DateRange | Size
Node = Leaf | Not | And | Or

TEXT_OPERATORS = {
    "from": TextField.FROM,
    "to": TextField.TO,
    "cc": TextField.CC,
    "recipient": TextField.RECIPIENT,
    "subject": TextField.SUBJECT,
    "body": TextField.BODY,
    "attachment": TextField.ATTACHMENT,
}
OPERATORS = (
    *TEXT_OPERATORS,
    "id",
    "thread",
    "folder",
    "account",
    "mimetype",
    "has",
    "is",
    "date",
    "after",
    "before",
    "newer_than",
    "older_than",
    "larger",
    "smaller",
)

_OPERATOR_RE = re.compile(r"([A-Za-z_]+):")
_DAY_RE = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?")
_AGE_RE = re.compile(r"(\d{1,6})([hdwmy])")
_SIZE_RE = re.compile(r"(\d{1,15})([kmg]?)b?")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def shown(text: str) -> str:
    """``text`` safe to print on one line: control, format and bidi characters escaped, bounded."""
    text = text if len(text) <= 40 else text[:40] + "..."
    return "".join(
        c if unicodedata.category(c)[0] not in "CZ" or c == " " else f"\\u{ord(c):04x}" for c in text
    )


def _is_space(char: str) -> bool:
    # Control and format characters (NUL, bidi overrides, zero-width) separate like spaces.
    return char.isspace() or unicodedata.category(char) in ("Cc", "Cf")


_DELIMITERS = '()"{}'


class _Parser:
    def __init__(self, query: str) -> None:
        self.text = query
        self.pos = 0
        self.depth = 0

    # -- characters ------------------------------------------------------------------------

    def skip_space(self) -> None:
        while self.pos < len(self.text) and _is_space(self.text[self.pos]):
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def error(self, message: str, position: int | None = None) -> QueryError:
        return QueryError((self.pos if position is None else position) + 1, message)

    def bare_word(self) -> str:
        """Characters up to a space or a delimiter (a "*" at the end is kept)."""
        start = self.pos
        while (
            self.pos < len(self.text)
            and not _is_space(self.text[self.pos])
            and self.text[self.pos] not in _DELIMITERS
        ):
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        start = self.pos
        end = self.text.find('"', start + 1)
        if end < 0:
            raise self.error('expected a closing " for the phrase that starts here', start)
        self.pos = end + 1
        return self.text[start + 1 : end]

    def star(self) -> bool:
        if self.pos < len(self.text) and self.text[self.pos] == "*":
            self.pos += 1
            return True
        return False

    # -- grammar -----------------------------------------------------------------------------

    def parse(self) -> Node:
        node = self.or_expr(closing="")
        if self.peek():  # only a ) or } can stop the top level early
            raise self.error(f"expected a term, found {self.text[self.pos]!r} with nothing to close")
        if node is None:
            raise self.error("expected something to search for (the query has no words)", 0)
        return node

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expected at most {MAX_DEPTH} levels of parentheses, braces or NOT")

    def or_expr(self, closing: str) -> Node | None:
        if self.at_keyword("OR"):
            raise self.error("expected a term before OR")
        children = [self.and_expr(closing)]
        while self.keyword("OR"):
            if self.at_end_of_group(closing):
                raise self.error("expected a term after OR")
            children.append(self.and_expr(closing))
        present = [c for c in children if c is not None]
        if not present:
            return None
        return present[0] if len(present) == 1 else Or(tuple(present))

    def keyword(self, word: str) -> bool:
        self.skip_space()
        end = self.pos + len(word)
        if self.text.startswith(word, self.pos) and (
            end == len(self.text) or _is_space(self.text[end]) or self.text[end] in "()"
        ):
            self.pos = end
            return True
        return False

    def at_end_of_group(self, closing: str) -> bool:
        char = self.peek()
        return char == "" or char == closing or char in ")}" or self.at_keyword("OR")

    def at_keyword(self, word: str) -> bool:
        saved = self.pos
        found = self.keyword(word)
        self.pos = saved
        return found

    def and_expr(self, closing: str) -> Node | None:
        children: list[Node] = []
        while not self.at_end_of_group(closing):
            if self.keyword("AND"):
                if self.at_end_of_group(closing):
                    raise self.error("expected a term after AND")
                continue
            child = self.unary(closing)
            if child is not None:
                children.append(child)
        if not children:
            return None
        return children[0] if len(children) == 1 else And(tuple(children))

    def unary(self, closing: str) -> Node | None:
        self.skip_space()
        start = self.pos
        negated = self.keyword("NOT")
        if not negated and self.text.startswith("-", self.pos):
            following = self.text[self.pos + 1 : self.pos + 2]
            if following and not _is_space(following) and following not in ")}":
                self.pos += 1
                negated = True
        if negated:
            if self.at_end_of_group(closing):
                raise self.error("expected a term after NOT or -", start)
            self.enter()
            child = self.unary(closing)
            self.depth -= 1
            return None if child is None else Not(child)
        return self.primary()

    def primary(self) -> Node | None:
        char = self.peek()
        start = self.pos
        if char == "(":
            self.enter()
            self.pos += 1
            node = self.or_expr(closing=")")
            if self.peek() != ")":
                raise self.error("expected ) to close the ( here", start)
            self.pos += 1
            self.depth -= 1
            return node
        if char == '"':
            phrase = self.quoted()
            return _free_text(phrase, phrase=True, prefix=self.star())
        if char in "{}":
            raise self.error(f"expected a word, found {char!r} (braces belong after thread:)")
        if char == ")":
            raise self.error("expected a term before ), or a ( to match it")
        operator = _OPERATOR_RE.match(self.text, self.pos)
        if operator:
            self.pos = operator.end()
            return self.operator(operator.group(1), start)
        word = self.bare_word()
        prefix = word.endswith("*")
        return _free_text(word.rstrip("*") if prefix else word, phrase=False, prefix=prefix)

    def operator(self, name: str, start: int) -> Node:
        key = name.lower()
        if key not in OPERATORS:
            close = difflib.get_close_matches(key, OPERATORS, n=1)
            hint = (
                f"did you mean {close[0]}:?"
                if close
                else "expected one of " + ", ".join(f"{o}:" for o in OPERATORS)
            )
            raise self.error(f"unknown operator {shown(name)}:; {hint}", start)
        value_at = self.pos
        if key == "thread" and self.pos < len(self.text) and self.text[self.pos] == "{":
            self.enter()
            self.pos += 1
            inner = self.or_expr(closing="}")
            if self.peek() != "}":
                raise self.error("expected } to close thread:{ here", value_at)
            self.pos += 1
            self.depth -= 1
            if inner is None:
                raise self.error("expected a query inside thread:{ }", value_at)
            return Thread(None, inner)
        phrase = self.pos < len(self.text) and self.text[self.pos] == '"'
        raw = self.quoted() if phrase else self.bare_word()
        prefix = self.star() if phrase else raw.endswith("*")
        value = raw[:-1] if prefix and not phrase else raw
        if not value.strip():
            raise self.error(f'expected a value after {key}: (a word, "a phrase" or an address)', value_at)
        if key in TEXT_OPERATORS:
            if not tokens(value) and key not in ("from", "to", "cc", "recipient"):
                raise self.error(f"expected letters or digits after {key}:", value_at)
            return Text(TEXT_OPERATORS[key], value, phrase, prefix)
        value = raw  # the other operators compare whole values: a "*" is part of it
        return _value_operator(key, value, lambda message: self.error(message, value_at))


def _free_text(value: str, *, phrase: bool, prefix: bool) -> Text | None:
    """A free word or phrase; ``None`` when it has no letters or digits (``&``, ``--``)."""
    if not tokens(value):
        return None
    return Text(TextField.ANY, value, phrase, prefix)


def _value_operator(key: str, value: str, error: Callable[[str], QueryError]) -> Node:
    fail = error
    if key == "id":
        inner = value.strip().removeprefix("<").removesuffix(">")
        return MessageId(f"<{inner}>")
    if key == "thread":
        return Thread(value, None)
    if key == "folder":
        return Folder("INBOX" if value.upper() == "INBOX" else value)
    if key == "account":
        return Account(value)
    if key == "mimetype":
        return MimeType(value.lower().removesuffix("/*"))
    if key == "has":
        if value.lower() != "attachment":
            raise fail("expected has:attachment")
        return HasAttachment()
    if key == "is":
        try:
            return Is(Flag(value.lower()))
        except ValueError:
            raise fail("expected is: followed by one of " + "|".join(f.value for f in Flag)) from None
    if key in ("larger", "smaller"):
        size = _SIZE_RE.fullmatch(value.lower())
        if size is None:
            raise fail(f"expected a size after {key}: such as 20k, 1M or 5000")
        amount = int(size.group(1)) * _SIZE_UNITS[size.group(2)]
        return Size(amount, None) if key == "larger" else Size(None, amount)
    if key in ("newer_than", "older_than"):
        age = _AGE_RE.fullmatch(value.lower())
        if age is None:
            raise fail(f"expected an age after {key}: such as 12h, 7d, 2w, 3m or 1y")
        ago = Ago(int(age.group(1)), AgeUnit(age.group(2)))
        return DateRange(ago, None) if key == "newer_than" else DateRange(None, ago)
    if key == "after":
        return DateRange(_period(value, fail)[0], None)
    if key == "before":
        return DateRange(None, _period(value, fail)[0])
    return _date_range(value, fail)


def _date_range(value: str, fail: Callable[[str], QueryError]) -> DateRange:
    if ".." not in value:
        start, end = _period(value, fail)
        return DateRange(start, end)
    low, _, high = value.partition("..")
    if not low and not high:
        raise fail("expected a date on at least one side of .. (2026-11-01..2026-11-30)")
    return DateRange(_period(low, fail)[0] if low else None, _period(high, fail)[1] if high else None)


def _period(value: str, fail: Callable[[str], QueryError]) -> tuple[date, date]:
    """The first day of a year, month or day written ``YYYY[-MM[-DD]]``, and the day after it."""
    match = _DAY_RE.fullmatch(value.replace("/", "-"))
    if match is None:
        raise fail(f"expected a date as YYYY, YYYY-MM or YYYY-MM-DD, found {shown(value)!r}")
    year, month, day = int(match.group(1)), match.group(2), match.group(3)
    try:
        if month is None:
            return date(year, 1, 1), date(year + 1, 1, 1) if year < 9999 else date(9999, 12, 31)
        if day is None:
            first = date(year, int(month), 1)
            days = calendar.monthrange(year, int(month))[1]
            return first, _next_day(date(year, int(month), days))
        moment = date(year, int(month), int(day))
        return moment, _next_day(moment)
    except ValueError:
        raise fail(f"expected a real date, found {shown(value)!r}") from None


def _next_day(day: date) -> date:
    return date.fromordinal(min(day.toordinal() + 1, date.max.toordinal()))


def parse(query: str) -> Node:
    """The tree of ``query``; raises ``QueryError``."""
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(MAX_QUERY_CHARS + 1, f"expected at most {MAX_QUERY_CHARS:,} characters")
    return _Parser(query).parse()


HELP = """\
query language (all terms must match; README "Search" has the details):
  invoice report        both words, anywhere in subject, addresses or body
  "quarterly report"    the phrase;  invo*  words starting with invo
  a OR b   a AND b   -a   NOT a   (a OR b) c      NOT/- binds tightest, then AND, then OR
  from:alice@example.com  from:example.com  from:alice  from:"Alice Smith"
  to:bob   cc:carol   recipient:dave (to or cc)   subject:invoice   body:"late fee"
  id:<abc@example.com>  thread:<root@example.com>  thread:{from:alice subject:plan}
  folder:INBOX   account:alice@example.com   attachment:report   mimetype:application/pdf
  has:attachment   is:unread|read|flagged|answered|draft|deleted|replied|quarantined
  date:2026-11-01..2026-11-30  date:2026-11  after:2026-01-01  before:2026-02-01
  newer_than:7d  older_than:1y  (h d w m y; dates in SEARCH_TIMEZONE, default UTC)
  larger:1M   smaller:20k
"""
